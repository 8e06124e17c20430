"""Checkpoints that survive a kill, exact resume, and what a resume refuses."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from clpd.training.checkpoint import COMPLETE, complete_checkpoints, verify_checkpoint
from clpd.errors import ClpdError
from clpd.training.state import TrainState
from clpd.commands.run_train import run_train
from tests.conftest import REPO, TINY_OVERRIDES, compose_config
from tests.test_cli import CLPD

QUIET = Console(quiet=True)
TIMING = ("tokens_per_s", "positions_per_s", "elapsed_s")  # the only fields of metrics.jsonl that may differ between runs

# CLPD proper, small: two tiny teachers switched on the curriculum's stages, easy-to-hard pacing,
# KD loss, a checkpoint every 3 of 12 steps.
LADDER = ["teachers.ladder=[{name: a, hidden_size: 16, num_layers: 1, num_heads: 2, intermediate_size: 32},"
          "{name: b, hidden_size: 24, num_layers: 1, num_heads: 2, intermediate_size: 48}]",
          "teachers.build.max_steps=2", "teachers.build.warmup_steps=1", "teachers.build.batch_size=4",
          "teachers.build.grad_accum=1", "teachers.build.eval=false"]
RUN = [*TINY_OVERRIDES, "method=clpd", *LADDER, "trainer.max_steps=12", "trainer.save_every=3",
       "trainer.eval_at_end=false", "trainer.grad_accum=2"]
LORA = ["student.lora.enabled=true", "student.lora.r=4", "student.lora.dropout=0.1"]  # dropout: the RNG matters

# Run in a subprocess that SIGKILLs itself at a point the test chooses.
KILLER = """
import json, os, signal, sys
from pathlib import Path
import torch
from rich.console import Console
import clpd.training.batches, clpd.training.checkpoint
from clpd.commands.run_train import run_train
from tests.conftest import compose_config

where, at, overrides, run_dir = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), Path(sys.argv[4])
calls = {"n": 0}

def killing(original):
    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return wrapped

if where == "mid-step":   # the at-th micro-batch: in the middle of an optimizer step
    clpd.training.batches.collate = killing(clpd.training.batches.collate)  # padded micro-batches
    clpd.training.batches.pack = killing(clpd.training.batches.pack)  # packed ones (one of the two layouts is used)
else:                     # the at-th torch.save: a checkpoint half-written (weights saved, state not)
    clpd.training.checkpoint.torch.save = killing(torch.save)
run_train(compose_config("train", overrides), run_dir, Console(quiet=True))
"""


def metrics(run_dir: Path) -> list:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def weights(checkpoint: Path) -> dict:
    name = "adapter_model.safetensors" if (checkpoint / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(checkpoint / name)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return f"teachers.cache_dir={tmp_path_factory.mktemp('teachers')}"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The uninterrupted run of each student, trained once for the module: (run dir, summary)."""
    done = {}

    def reference(student: str, overrides: list) -> tuple[Path, dict]:
        if student not in done:
            folder = tmp_path_factory.mktemp(f"reference-{student}")
            done[student] = (folder, run_train(compose_config("train", overrides), folder, QUIET))
        return done[student]
    return reference


@pytest.mark.slow
@pytest.mark.parametrize("student", ["full", "lora"])
@pytest.mark.parametrize("where, at", [("mid-step", 2 * 8 + 2), ("mid-save", 2)])
def test_a_run_killed_with_sigkill_and_resumed_ends_bit_for_bit_like_an_uninterrupted_one(tmp_path, cache, references,
                                                                                           student, where, at):
    # mid-step: killed in step 9 (its 2nd micro-batch; grad_accum=2), after the checkpoint of step 6.
    # mid-save: killed while writing the checkpoint of step 6, so its .tmp folder is left behind.
    overrides = [*RUN, cache, *(LORA if student == "lora" else [])]
    run = tmp_path / "run"
    # The run that is killed starts first; the uninterrupted reference (one per student) trains meanwhile.
    killer = subprocess.Popen([sys.executable, "-c", KILLER, where, str(at), json.dumps(overrides), str(run)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reference_dir, reference = references(student, overrides)
    _, stderr = killer.communicate(timeout=300)
    assert killer.returncode == -signal.SIGKILL, stderr
    assert json.loads((run / "status.json").read_text()) == {"status": "running"}  # nobody could record the kill
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == (
        ["step-0000003", "step-0000006"] if where == "mid-step" else ["step-0000003"])
    if where == "mid-save":
        (leftover,) = (run / "checkpoints").glob("step-0000006.*tmp")  # step-0000006.<pid>-<random>.tmp
        assert leftover.is_dir() and not (leftover / COMPLETE).exists()

    resumed = run_train(compose_config("train", [*overrides, "trainer.resume=auto"]), run, QUIET)
    assert resumed["resumed_from"].endswith("step-0000006" if where == "mid-step" else "step-0000003")
    assert json.loads((run / "status.json").read_text()) == {"status": "ok"}
    final, expected = weights(run / "checkpoints" / "final"), weights(reference_dir / "checkpoints" / "final")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    assert metrics(run) == metrics(reference_dir)  # the whole log, from the resume point on too
    assert [s["to"] for s in resumed["teacher_switches"]] == [s["to"] for s in reference["teacher_switches"]] == ["a", "b"]
    assert resumed["tokens_seen"] == reference["tokens_seen"] and resumed["steps"] == reference["steps"] == 12
    assert not list((run / "checkpoints").glob("*.tmp"))  # the leftover of the killed save was cleaned up


def test_only_the_newest_keep_last_step_checkpoints_are_kept_and_each_is_complete(tmp_path):
    cfg = compose_config("train", ["+experiment=arith_sft", *TINY_OVERRIDES, "trainer.max_steps=9", "trainer.save_every=2",
                                   "trainer.keep_last=2"])
    summary = run_train(cfg, tmp_path, QUIET)
    kept = complete_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in kept] == ["step-0000006", "step-0000008"]
    for checkpoint in [*kept, tmp_path / "checkpoints" / "final"]:
        verify_checkpoint(checkpoint)
        assert {"training_state.pt", "manifest.json", "metrics.jsonl", "clpd_config.yaml"} <= {p.name for p in checkpoint.iterdir()}
    assert [s["step"] for s in summary["checkpoint_saves"]] == [2, 4, 6, 8, 9]
    state = torch.load(kept[-1] / "training_state.pt", weights_only=True)
    assert state["step"] == 8 and set(state) == set(TrainState.SAVED)


def _stopped_run(tmp_path, cache, max_steps: int = 6, dies_in_step: int = 5) -> Path:
    """A run that died in ``dies_in_step`` (a KeyboardInterrupt before any handler): with the
    default arguments a run with the step-3 checkpoint only."""
    run = tmp_path / "run"
    run_train(compose_config("train", [*RUN, cache, "teachers.build_only=true"]), tmp_path / "teachers", QUIET)
    cfg = compose_config("train", [*RUN, cache, f"trainer.max_steps={max_steps}"])
    with pytest.raises(KeyboardInterrupt):
        import clpd.training.batches

        original = clpd.training.batches.Batches.step

        def step(self, step, *args, **kwargs):
            if step + 1 == dies_in_step:  # while drawing that step's batch, before any of its micro-batches
                raise KeyboardInterrupt  # as if the process died there
            return original(self, step, *args, **kwargs)

        clpd.training.batches.Batches.step = step
        try:
            run_train(cfg, run, QUIET)
        finally:
            clpd.training.batches.Batches.step = original
    return run


def test_resume_refuses_a_different_config_naming_what_differs_unless_forced(tmp_path, cache):
    run = _stopped_run(tmp_path, cache)
    assert json.loads((run / "status.json").read_text())["status"] == "interrupted"
    changed = compose_config("train", [*RUN, cache, "trainer.max_steps=6", "trainer.lr=0.001", "trainer.resume=auto"])
    with pytest.raises(ClpdError, match=r"different run: trainer.lr: 0.005 -> 0.001\. .*trainer.resume_force=true"):
        run_train(changed, run, QUIET)
    forced = compose_config("train", [*RUN, cache, "trainer.max_steps=6", "trainer.lr=0.001", "trainer.resume=auto",
                                      "trainer.resume_force=true"])
    assert run_train(forced, run, QUIET)["steps"] == 6


def test_a_new_run_in_a_dir_with_unfinished_checkpoints_is_refused_and_nothing_is_touched(tmp_path, cache):
    run = _stopped_run(tmp_path, cache)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(ClpdError, match="unfinished run .*trainer.resume=auto"):
        run_train(compose_config("train", [*RUN, cache, "trainer.max_steps=6"]), run, QUIET)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_resuming_an_earlier_checkpoint_into_a_dir_with_later_ones_is_refused_and_nothing_is_touched(tmp_path, cache):
    run = _stopped_run(tmp_path, cache, max_steps=12, dies_in_step=11)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert before == ["step-0000006", "step-0000009"]  # keep_last=2
    earlier = compose_config("train", [*RUN, cache, "trainer.max_steps=12",
                                       f"trainer.resume={run / 'checkpoints' / 'step-0000006'}"])
    with pytest.raises(ClpdError, match=r"already holds later checkpoints \(step-0000009\), which resuming from an "
                                        r"earlier one would overwrite"):
        run_train(earlier, run, QUIET)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    import errno

    import clpd.training.checkpoint

    saves = {"n": 0}
    original = torch.save

    def full_disk(*args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:  # the second checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)

    monkeypatch.setattr(clpd.training.checkpoint.torch, "save", full_disk)
    cfg = compose_config("train", ["+experiment=arith_sft", *TINY_OVERRIDES, "trainer.max_steps=6", "trainer.save_every=2"])
    with pytest.raises(ClpdError, match=r"could not write checkpoint .*step-0000004: No space left on device; "
                                        r"the checkpoints written before are intact \(step-0000002\)"):
        run_train(cfg, tmp_path, QUIET)
    verify_checkpoint(tmp_path / "checkpoints" / "step-0000002")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002"]  # no .tmp left
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_exits_143_and_the_printed_command_resumes_it_exactly(tmp_path):
    # Through the real CLI. Enough steps that the signal (sent once the first line is logged)
    # arrives mid-run; the run then ends with the same weights as one that was never stopped.
    args = ["+experiment=arith_sft", *TINY_OVERRIDES, "trainer.max_steps=150", "trainer.eval_at_end=false"]
    # The uninterrupted reference runs beside the run that is stopped (tiny models leave cores idle).
    reference = subprocess.Popen([CLPD, "train", *args, f"hydra.run.dir={tmp_path / 'reference'}"], cwd=tmp_path,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    process = subprocess.Popen([CLPD, "train", *args, f"hydra.run.dir={run}"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("clpd train: stopped by SIGTERM after step ") and "Traceback" not in stderr
    assert json.loads((run / "status.json").read_text())["status"] == "interrupted"
    step = int(last.split("after step ")[1].split(";")[0])
    assert 0 < step < 150 and complete_checkpoints(run / "checkpoints")[-1].name == f"step-{step:07d}"
    _, reference_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_err

    command = shlex.split(last.split("To resume: ")[1])
    assert command[-2:] == [f"hydra.run.dir={run}", "trainer.resume=auto"]
    resumed = subprocess.run([CLPD, *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    final, expected = weights(run / "checkpoints" / "final"), weights(tmp_path / "reference" / "checkpoints" / "final")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert metrics(run)[-1] == metrics(tmp_path / "reference")[-1]


def test_resume_auto_on_a_finished_run_does_nothing_so_a_relaunched_sweep_skips_what_is_done(tmp_path):
    base = ["+experiment=arith_sft", *TINY_OVERRIDES, "trainer.resume=auto"]
    summary = run_train(compose_config("train", base), tmp_path, QUIET)  # auto with nothing to resume: a fresh run
    stamp = (tmp_path / "summary.json").stat().st_mtime_ns
    assert run_train(compose_config("train", base), tmp_path, QUIET) == summary
    assert (tmp_path / "summary.json").stat().st_mtime_ns == stamp
    with pytest.raises(ClpdError, match=r"finished run with another config \(trainer.lr: 0.005 -> 0.001\)"):
        run_train(compose_config("train", [*base, "trainer.lr=0.001"]), tmp_path, QUIET)
    # a copy of the sweep (scripts/archive_runs.sh) continued with its teachers in another folder
    moved = run_train(compose_config("train", [*base, f"teachers.cache_dir={tmp_path / 'elsewhere'}"]), tmp_path, QUIET)
    assert moved == summary
