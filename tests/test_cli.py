"""The `clpd` command as a user types it: help, one-line errors, completion, runs and sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_OVERRIDES

CLPD = str(Path(sys.executable).parent / "clpd")


def clpd(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([CLPD, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def started(*command: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(list(command), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def test_help_lists_every_command_with_one_line_each(tmp_path):
    out = clpd("--help", cwd=tmp_path)
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    for command in ("train", "eval", "plan"):
        assert sum(line.split()[:1] == [command] for line in lines) == 1


def test_plan_prints_the_timeline_and_writes_its_figure_into_outputs_plan(tmp_path):
    out = clpd("plan", "+experiment=arith", "method=clpd", "trainer.max_steps=30", "benchmark.train_size=300", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "small" in out.stdout and "medium" in out.stdout and "large" in out.stdout
    (run,) = (tmp_path / "outputs" / "plan").glob("*/*")
    assert (run / "plan.png").stat().st_size > 10_000
    plan = json.loads((run / "plan.json").read_text())
    assert len(plan["steps"]) == 30 and plan["teachers"] == ["small", "medium", "large"]


def test_an_unknown_command_is_refused_with_the_commands(tmp_path):
    out = clpd("trian", cwd=tmp_path)
    assert out.returncode == 2 and "train, eval, plan" in out.stderr


def _broken_gsm8k(tmp_path: Path) -> str:
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    good = json.dumps({"question": "1+1?", "answer": "1+1 = <<1+1=2>>2\n#### 2"})
    (folder / "train.jsonl").write_text(good + "\n" + '{"question": "broken", "answer": \n')
    (folder / "test.jsonl").write_text(good + "\n")
    return str(folder)


BAD_INPUTS = {
    "unknown benchmark": (["train", "benchmark=nope"], "available: arith, gsm8k, jsonl, svamp"),
    "unknown precision": (["train", "trainer.precision=fp8"], "expected one of [auto, fp32, bf16, fp16]"),
    "missing data dir": (["train", "benchmark=gsm8k", "benchmark.data_dir=/does/not/exist"], "/does/not/exist"),
    "missing checkpoint": (["eval", "checkpoint=/does/not/exist"], "/does/not/exist"),
    "broken gsm8k line": (["train", "benchmark=gsm8k", "benchmark.data_dir={broken}"], "train.jsonl:2"),
    "unknown pacing": (["plan", "curriculum.pacing=foo"], "expected one of [none, linear, root, quadratic"),
    "start out of range": (["plan", "curriculum.start=1.5"], "curriculum.start=1.5 must be in (0, 1]"),
    "teacher_loss teacher not in the ladder": (
        ["train", "+experiment=arith", "curriculum.difficulty=teacher_loss", "curriculum.teacher=giant"],
        "curriculum.teacher=giant must name a teacher of the ladder"),
}


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict:
    """Every case of BAD_INPUTS as a user types it, all started at once (each is seconds of imports
    on one core): {case: (args, completed process)}."""
    tmp = tmp_path_factory.mktemp("bad-input")
    broken = _broken_gsm8k(tmp)
    cases = {case: [a.format(broken=broken) if "{broken}" in a else a for a in args]
             for case, (args, _) in BAD_INPUTS.items()}
    folders = {case: tmp / f"case{i}" for i, case in enumerate(cases)}  # each its own outputs/
    for folder in folders.values():
        folder.mkdir()
    runs = {case: started(CLPD, *args, cwd=folders[case]) for case, args in cases.items()}
    return {case: (cases[case], finished(run)) for case, run in runs.items()}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_non_zero_with_one_clear_line_and_no_traceback(case, refused):
    expected = BAD_INPUTS[case][1]
    args, out = refused[case]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode != 0
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"clpd {args[0]}: error:") and expected in lines[0]
    assert "Traceback" not in out.stderr + out.stdout


def test_bash_completion_completes_commands_and_config_keys(tmp_path):
    words = clpd("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "clpd tr"})
    assert words.stdout.split() == ["train"]
    keys = clpd("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": "clpd train trainer.max_st"})
    assert "trainer.max_steps=" in keys.stdout.split()
    script = clpd("train", "-sc", "install=bash", cwd=tmp_path)
    assert script.returncode == 0 and "complete -o nospace -o default -F hydra_bash_completion clpd" in script.stdout


def test_cfg_job_prints_the_composed_experiment(tmp_path):
    out = clpd("train", "+experiment=arith_sft", "trainer.max_steps=7", "--cfg", "job", cwd=tmp_path)
    assert out.returncode == 0 and "max_steps: 7" in out.stdout and "name: arith" in out.stdout


@pytest.mark.slow
def test_train_then_eval_through_the_cli_and_load_the_checkpoint_with_plain_transformers(tmp_path):
    run = tmp_path / "run"
    out = clpd("train", "+experiment=arith_sft", *TINY_OVERRIDES, f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    final = run / "checkpoints" / "final"
    assert (final / "clpd_config.yaml").exists() and json.loads((run / "status.json").read_text())["status"] == "ok"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3  # log_every=1, 3 steps

    # Three independent commands on the checkpoint, started together: eval, plain transformers, a rerun.
    evaluation = started(CLPD, "eval", f"checkpoint={final}", "benchmark.test_size=16", "benchmark.max_steps=2",
                         "max_new_tokens=8", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    code = ("import sys; sys.modules['clpd'] = None\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained({str(final)!r}); model = AutoModelForCausalLM.from_pretrained({str(final)!r})\n"
            "print(type(model).__name__, len(tok))")
    loaded = started(sys.executable, "-c", code, cwd=tmp_path)
    again = started(CLPD, "train", "+experiment=arith_sft", *TINY_OVERRIDES, f"hydra.run.dir={run}", cwd=tmp_path)
    out, loaded, again = (finished(p) for p in (evaluation, loaded, again))

    assert out.returncode == 0, out.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 16 and {"accuracy_strict", "accuracy_flexible", "by_difficulty"} <= set(metrics)
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 16
    assert {"id", "question", "gold", "output", "extracted_strict", "extracted_flexible", "correct_strict"} <= set(predictions[0])

    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == ["LlamaForCausalLM", "100"]
    assert again.returncode == 1 and "already holds a finished run" in again.stderr


@pytest.mark.slow
def test_a_multirun_sweep_runs_each_job_into_its_own_dir(tmp_path):
    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY_OVERRIDES if not o.startswith(("trainer.max_steps", "trainer.log_every"))]
    out = clpd("train", "-m", "+experiment=arith_sft", "seed=0,1", "trainer.max_steps=20", *tiny,
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summaries = [json.loads((sweep / job / "summary.json").read_text()) for job in ("0", "1")]
    assert [s["steps"] for s in summaries] == [20, 20]
    assert summaries[0]["final_loss"] != summaries[1]["final_loss"]  # different seeds, different runs


@pytest.mark.slow
def test_a_wheel_install_finds_its_configs_from_any_directory(tmp_path):
    pytest.importorskip("setuptools")
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(repo)], check=True, capture_output=True)
    wheel = next((tmp_path / "wheel").glob("clpd-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    code = ("import sys, clpd; assert clpd.__file__.startswith(sys.argv[1]), clpd.__file__\n"
            "sys.argv = ['clpd', 'train', '+experiment=arith_sft', '--cfg', 'job']\n"
            "from clpd.cli import main; main()")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert out.returncode == 0, out.stderr
    assert "name: arith" in out.stdout
