"""Sweeps on Hydra's launcher plugins (the optional extra clpd[sweep]): joblib in parallel processes,
submitit (local here, SLURM on a cluster) with the requeue of a job that the scheduler warns."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from clpd.config.schema import register_configs
from tests.conftest import TINY_OVERRIDES
from tests.test_cli import CLPD
from tests.test_resume import weights

pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the sweep extra: pip install -e '.[sweep]'")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the sweep extra: pip install -e '.[sweep]'")

SFT = ["+experiment=arith_sft", *TINY_OVERRIDES, "trainer.eval_at_end=false"]


def env_without_thread_settings() -> dict:
    # What a user's shell has: no OMP_NUM_THREADS, so joblib's own per-worker setting shows.
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def clpd(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([CLPD, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env_without_thread_settings())


def metrics(run_dir: Path) -> list:
    """metrics.jsonl without its timings (the only fields that differ between equal runs)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "elapsed_s" and not k.endswith("_per_s")} for row in rows]


def summaries(sweep: Path) -> dict:
    """seed -> (summary, run dir) of each job of a sweep."""
    out = {}
    for summary in sweep.glob("*/summary.json"):
        seed = int(json.loads((summary.parent / ".hydra" / "config.yaml").read_text().split("\nseed: ")[1].split()[0]))
        out[seed] = (json.loads(summary.read_text()), summary.parent)
    return out


# --- refused before any job starts ----------------------------------------------------------------

@pytest.mark.parametrize("n_jobs", ["0", "-1"])
def test_n_jobs_below_one_is_refused_in_one_line_before_any_job(tmp_path, n_jobs):
    result = clpd("train", "-m", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}", *SFT, "seed=0,1",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"clpd train: error: hydra.launcher.n_jobs={n_jobs}: the number of runs at once must be >= 1")
    assert "Traceback" not in result.stderr and not (tmp_path / "sweep").exists()


def test_a_launcher_that_is_not_installed_is_refused_with_the_extra_to_install(tmp_path):
    result = clpd("train", "-m", "hydra/launcher=ray", *SFT, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "Could not find 'hydra/launcher/ray'; available: basic, joblib, slurm, submitit_local" in line
    assert line.endswith("need pip install 'clpd[sweep]' (in a checkout: pip install -e '.[sweep]')")


def test_the_shipped_slurm_launcher_becomes_an_sbatch_array_with_the_preemption_signal(tmp_path, monkeypatch):
    import submitit
    from hydra import compose, initialize_config_module
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_module(config_module="clpd.conf", version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher)
    assert launcher.pop("_target_").endswith("SlurmLauncher") and launcher["max_num_timeout"] == 3
    # The executor hydra-submitit-launcher builds (its launch()), on a machine where srun "exists".
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "jobs",
                                     slurm_max_num_timeout=launcher.pop("max_num_timeout"))
    launcher.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in launcher.items()})
    executor._executor.parameters["map_count"] = 4  # as map_array sets it for a sweep of 4 jobs
    sbatch = executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for flag in ("--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=8", "--time=30", "--signal=USR2@120",
                 "--array=0-3%4", "--mem=64GB", "--ntasks-per-node=1"):
        assert f"#SBATCH {flag}\n" in sbatch, sbatch


# --- joblib: parallel processes, each on cores / n_jobs threads --------------------------------------

@pytest.mark.slow
def test_a_joblib_sweep_runs_jobs_at_once_on_cores_per_job_threads_and_equals_the_jobs_run_one_by_one(tmp_path):
    from joblib import cpu_count

    threads = max(cpu_count() // 2, 1)
    parallel = clpd("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SFT, "seed=0,1",
                    f"hydra.sweep.dir={tmp_path / 'parallel'}", cwd=tmp_path)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    one_by_one = clpd("train", "-m", *SFT, "seed=0,1", f"trainer.num_threads={threads}",
                      f"hydra.sweep.dir={tmp_path / 'serial'}", cwd=tmp_path)
    assert one_by_one.returncode == 0, one_by_one.stderr[-3000:]

    jobs, reference = summaries(tmp_path / "parallel"), summaries(tmp_path / "serial")
    assert sorted(jobs) == sorted(reference) == [0, 1]
    for seed in (0, 1):
        (summary, run), (expected, expected_run) = jobs[seed], reference[seed]
        assert summary["environment"]["threads"] == threads == expected["environment"]["threads"]
        final, other = weights(run / "checkpoints" / "final"), weights(expected_run / "checkpoints" / "final")
        assert all(torch.equal(final[k], other[k]) for k in other)
        assert metrics(run) == metrics(expected_run)
    assert metrics(jobs[0][1]) != metrics(jobs[1][1])  # two seeds, two runs


# --- submitit: separate processes, and a job the scheduler warns is requeued and resumes ---------------

@pytest.mark.slow
def test_a_2x2_submitit_sweep_runs_as_separate_processes_and_clpd_report_reads_it(tmp_path):
    sweep = tmp_path / "sweep"
    result = clpd("train", "-m", "hydra/launcher=submitit_local", *SFT, "seed=0,1", "trainer.lr=0.005,0.001",
                  "trainer.num_threads=1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # submitit's local executor runs each job in its own process, its folder named by the job id (a pid).
    assert len({p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()}) == 4  # and %j: submitit's pickles
    report = clpd("report", str(sweep), "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    with (tmp_path / "report" / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["seed"], float(r["trainer.lr"])) for r in rows) == [
        ("0", 0.001), ("0", 0.005), ("1", 0.001), ("1", 0.005)]
    assert {r["status"] for r in rows} == {"completed"}


def descendants(pid: int) -> list:
    """(pid, command line) of every process below ``pid``."""
    children: dict = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                out.append((child, (Path("/proc") / str(child) / "cmdline").read_text().replace("\0", " ")))
            except OSError:
                continue
            todo.append(child)
    return out


@pytest.mark.slow
def test_a_submitit_job_sent_the_preemption_signal_saves_is_requeued_and_resumes_to_the_same_end(tmp_path):
    # SIGUSR2 is what submitit has SLURM send before a time limit and on preemption (sbatch
    # --signal=USR2@signal_delay_s). The run checkpoints, hands the signal to submitit, which
    # requeues the job; the requeued job, with trainer.resume=auto, continues from the checkpoint.
    args = [*SFT, "trainer.max_steps=150", "trainer.num_threads=1", "trainer.resume=auto"]
    # The uninterrupted reference runs beside the sweep (one thread each, on 2 cores).
    reference = subprocess.Popen([CLPD, "train", *args, f"hydra.run.dir={tmp_path / 'reference'}"], cwd=tmp_path,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env_without_thread_settings())
    sweep = tmp_path / "sweep"
    process = subprocess.Popen([CLPD, "train", "-m", "hydra/launcher=submitit_local", *args,
                                f"hydra.sweep.dir={sweep}"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env_without_thread_settings())
    log = sweep / "0" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (log.exists() and log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    [job] = [pid for pid, command in descendants(process.pid) if "submitit.core._submit" in command]
    os.kill(job, signal.SIGUSR2)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]

    run = sweep / "0"
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads((run / "status.json").read_text())["status"] == "ok"
    assert summary["resumed_from"] and Path(summary["resumed_from"]).name.startswith("step-"), summary["resumed_from"]
    step = int(Path(summary["resumed_from"]).name.split("-")[1])
    assert 0 < step < 150
    job_log = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*.out"))
    job_log += "".join(p.read_text() for p in (sweep / ".submitit").rglob("*.err"))
    assert f"clpd train: stopped by SIGUSR2 after step {step}" in job_log
    assert "Requeued job" in job_log

    _, reference_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_err[-3000:]
    final, expected = weights(run / "checkpoints" / "final"), weights(tmp_path / "reference" / "checkpoints" / "final")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert metrics(run) == metrics(tmp_path / "reference")
