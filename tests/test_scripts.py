"""The sweep scripts of scripts/, run as a user runs them, with tiny models so they take seconds."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY_OVERRIDES

# arith_plateau trains its medium teacher longer (teachers.build_overrides): shorten that one too.
TINY_LADDER_BUILD = ["teachers.build.max_steps=2", "teachers.build_overrides.medium.max_steps=2",
                     "teachers.build.batch_size=4", "teachers.build.grad_accum=1", "teachers.build.warmup_steps=1",
                     "trainer.grad_accum=1"]


def script(name: str, *overrides: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])  # the venv's clpd
    # No OMP_NUM_THREADS from the test's environment: a user's shell has none, and joblib keeps it.
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run(["bash", str(REPO / "scripts" / name), *overrides], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**base, "PATH": path, **env})


@pytest.mark.slow
def test_the_ablation_script_is_one_joblib_sweep_over_every_arm_and_seed_and_a_relaunch_skips_them(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the sweep extra: pip install -e '.[sweep]'")
    from joblib import cpu_count

    overrides = [*TINY_OVERRIDES, *TINY_LADDER_BUILD, f"teachers.cache_dir={tmp_path / 'cache'}"]
    arms = ["sft", "clpd"]  # two of the five, to keep this test short
    env = {"JOBS": "2", "SEEDS": "0,1", "OUT": "ablation", "ARMS": ",".join(arms)}
    first = script("reproduce_ablation.sh", *overrides, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    out = tmp_path / "ablation"
    # the one sweep it runs, printed: seeds outer, so a sweep stopped part-way holds complete pairs
    assert ("+ clpd train -m hydra/launcher=joblib hydra.launcher.n_jobs=2 +experiment=arith seed=0,1 method=sft,clpd "
            "trainer.eval_every=150 trainer.save_every=500 trainer.resume=auto hydra.sweep.dir=ablation/runs "
            "hydra.sweep.subdir=seed${seed}/${hydra:runtime.choices.method}") in first.stdout
    with (out / "report.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted((a, s) for a in arms for s in ("0", "1"))
    assert {r["status"] for r in runs} == {"completed"}
    assert (out / "report.md").exists() and (out / "report.png").exists()
    summaries = sorted(out.glob("runs/*/*/summary.json"))
    assert [str(p.parent.relative_to(out)) for p in summaries] == [
        f"runs/seed{s}/{a}" for s in (0, 1) for a in sorted(arms)]
    threads = {json.loads(p.read_text())["environment"]["threads"] for p in summaries}
    assert threads == {max(cpu_count() // 2, 1)}  # joblib's OMP_NUM_THREADS = cores / n_jobs in each worker

    again = script("reproduce_ablation.sh", *overrides, env=env, cwd=tmp_path)
    assert again.returncode == 0
    # the ladder's run (teachers already built) and the four runs: nothing trains again
    assert again.stdout.count("already finished (trainer.resume=auto): nothing to resume") == 5


def test_archiving_runs_keeps_what_the_report_reads_drops_checkpoints_and_never_overwrites(tmp_path):
    from clpd.report.records import collect_runs
    from clpd.report.stats import group_runs
    from tests.test_report import make_sweep

    sweep = make_sweep(tmp_path / "src")
    job = sweep / "0"  # a completed standard_kd run: give it what a real run also leaves
    (job / "checkpoints" / "final").mkdir(parents=True)
    (job / "checkpoints" / "final" / "model.safetensors").write_bytes(b"weights")
    (job / "checkpoints" / "final" / "manifest.json").write_text('{"ladder": []}')  # which teachers and data
    (job / "checkpoints" / "final" / "metrics.jsonl").write_text("{}\n")
    (job / "eval").mkdir(exist_ok=True)
    (job / "eval" / "predictions.jsonl").write_text('{"id": 1}\n')
    (job / "train.log").write_text("log\n")

    first = script("archive_runs.sh", str(sweep), "kept", env={}, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    kept = tmp_path / "kept"
    copied = {str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()}
    assert {"0/.hydra/config.yaml", "0/.hydra/overrides.yaml", "0/.hydra/hydra.yaml", "0/status.json",
            "0/summary.json", "0/metrics.jsonl", "0/checkpoints/final/manifest.json"} <= copied
    assert not any(p.endswith(("model.safetensors", "predictions.jsonl", "train.log")) for p in copied)
    assert "0/checkpoints/final/metrics.jsonl" not in copied

    def table(root):
        return [(g["label"], g["accuracy_strict"]["values"], g["vs_baseline"]) for g in group_runs(collect_runs([root]))]
    assert table(kept) == table(sweep)

    (kept / "0" / "summary.json").write_text("{}")  # an archive edited by hand is not replaced
    again = script("archive_runs.sh", str(sweep), "kept", env={}, cwd=tmp_path)
    assert again.returncode == 0 and "keeping the existing" in again.stderr
    assert (kept / "0" / "summary.json").read_text() == "{}"

    missing = script("archive_runs.sh", str(tmp_path / "nowhere"), "kept", env={}, cwd=tmp_path)
    assert missing.returncode == 1 and "is not a directory" in missing.stderr


def gap_run(root: Path, arm: str, seed: int, acc: float) -> None:
    """A finished run of scripts/arith_gap.sh PART=gap as its records keep it: arm "sft" or a rung."""
    run = root / f"seed{seed}" / arm
    (run / ".hydra").mkdir(parents=True)
    sft = arm == "sft"
    config = {"method": None, "seed": seed, "distill": {"loss": "sft" if sft else "forward_kl"},
              "teachers": {"schedule": "fixed", "fixed": "xs" if sft else arm}}
    (run / ".hydra" / "config.yaml").write_text(json.dumps(config))
    (run / ".hydra" / "overrides.yaml").write_text(json.dumps(
        [f"method={'sft' if sft else 'standard_kd'}", *([] if sft else [f"teachers.fixed={arm}"]), f"seed={seed}"]))
    (run / "status.json").write_text('{"status": "ok"}')
    (run / "summary.json").write_text(json.dumps({"eval": {"accuracy_strict": acc, "n": 1000}}))
    sizes = {"xs": 17496, "m": 258160, "xl": 1348640}
    (run / "teachers.json").write_text(json.dumps([{"name": k, "parameters": v} for k, v in sizes.items()]))


def test_the_gap_figure_compares_every_rung_and_sft_to_the_best_rung_seed_by_seed(tmp_path):
    # xs / m / xl / sft over seeds 0-2; m is best (0.60 mean); xl - m: -0.10, -0.12, -0.08 (all below 0).
    accs = {"xs": (0.10, 0.12, 0.08), "m": (0.60, 0.62, 0.58), "xl": (0.50, 0.50, 0.50), "sft": (0.30, 0.33, 0.36)}
    for arm, values in accs.items():
        for seed, acc in enumerate(values):
            gap_run(tmp_path / "runs", arm, seed, acc)
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gap_figure.py"), str(tmp_path / "runs"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    table = out.stdout.splitlines()
    assert table[2].startswith("| sft | - | 0.330 ± 0.030 | 3 | -0.270 [")
    assert table[3].startswith("| xs | 0.017M | 0.100 ± 0.020 | 3 | -0.500 [")
    assert table[4] == "| m | 0.258M | 0.600 ± 0.020 | 3 | best | - |"
    # xl - m = -0.10 ± 0.02 (sd of -0.10, -0.12, -0.08): 4.3027 * 0.02 / sqrt(3) = 0.0497 each side.
    # Detectable at 80% power: (4.3027 + 1.0607) * 0.02 / sqrt(3) = 0.062.
    assert table[5] == "| xl | 1.349M | 0.500 ± 0.000 | 3 | -0.100 [-0.150, -0.050] (3 pairs) | ±0.062 |"
    assert "The strongest teacher (xl) gives a student -0.100 [-0.150, -0.050] behind the best rung (m): " \
           "a worse student" in out.stdout
    # Then the blocks the intervals pair: one row per seed, the arms in the table's order.
    assert table[-5:] == ["| seed | sft | xs | m | xl |", "|---|---|---|---|---|",
                          "| 0 | 0.300 | 0.100 | 0.600 | 0.500 |", "| 1 | 0.330 | 0.120 | 0.620 | 0.500 |",
                          "| 2 | 0.360 | 0.080 | 0.580 | 0.500 |"]
    assert (tmp_path / "out" / "gap.png").stat().st_size > 0 and (tmp_path / "out" / "gap.md").is_file()


def test_the_gap_script_refuses_an_unknown_part_in_one_line(tmp_path):
    out = script("arith_gap.sh", env={"PART": "all"}, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["PART=all: unknown part; allowed: gap, arms, placement"]


def test_every_sweep_script_resumes_its_teachers_build_so_a_second_part_into_the_same_out_reuses_it():
    # The teachers (and their stores) are built once into $OUT/teachers; without trainer.resume=auto
    # a second launch into the same OUT stops there on "already holds a finished run".
    builds = []
    for path in sorted((REPO / "scripts").glob("*.sh")):
        commands = path.read_text().replace("\\\n", " ").splitlines()
        builds += [(path.name, c) for c in commands if "clpd train " in c and "hydra.run.dir=$OUT/teachers" in c]
    assert {name for name, _ in builds} >= {"arith_gap.sh", "distill_modes.sh", "reproduce_ablation.sh", "sweep_pacing.sh"}
    assert [name for name, command in builds if "trainer.resume=auto" not in command] == []


def test_the_committed_arith_gap_ladder_is_the_one_its_checksums_and_its_preset_name():
    import hashlib

    from omegaconf import OmegaConf

    folder = REPO / "docs" / "results" / "arith-gap" / "ladder"
    sums = dict(reversed(line.split()) for line in (folder / "SHA256SUMS").read_text().splitlines())
    preset = OmegaConf.load(REPO / "conf" / "teachers" / "arith_gap.yaml")
    assert [t.path for t in preset.ladder] == [f"docs/results/arith-gap/ladder/{n}" for n in ("xs", "s", "m", "l", "xl")]
    for rung in preset.ladder:
        weights = REPO / rung.path / "model.safetensors"
        if not weights.is_file():  # weights stay out of git: built by scripts/gap_ladder.sh, checked when there
            continue
        assert hashlib.sha256(weights.read_bytes()).hexdigest() == sums[f"./{rung.name}/model.safetensors"]
