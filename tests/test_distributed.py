"""One run on two processes (torchrun, gloo on the CPU): the same losses as one process, rank 0
writes, a signal to any rank stops them all with one checkpoint, and resume is exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clpd.training.checkpoint import complete_checkpoints
from tests.conftest import TINY_OVERRIDES
from tests.test_cli import CLPD
from tests.test_teachers import LADDER

TIMING = {"tokens_per_s", "positions_per_s", "elapsed_s"}
# 8 examples a step in 2 micro-batches: each rank takes 2 rows of each micro-batch.
RUN = ["+experiment=arith_sft", *[o for o in TINY_OVERRIDES if not o.startswith("trainer.max_steps")],
       "trainer.batch_size=8", "trainer.grad_accum=2"]
KD = ["method=none", "distill=forward_kl", "distill.alpha=0.5", "teachers.name=test", *LADDER,
      "teachers.schedule=progressive", "teachers.build.max_steps=2", "teachers.build.warmup_steps=1",
      "teachers.build.batch_size=4", "teachers.build.grad_accum=1"]


def torchrun(*args: str, cwd: Path, **popen) -> subprocess.Popen:
    # --standalone: a rendezvous on a free local port, so tests never collide on MASTER_PORT.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "clpd", "train", *args]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)


def finished(process: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def metrics(run: Path) -> list:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def weights(checkpoint: Path) -> dict:
    return load_file(checkpoint / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("supervision", ["sft", "kd", "stored"])
def test_two_ranks_give_the_losses_of_one_process_with_the_same_global_batch(tmp_path, supervision):
    # stored: each rank reads the stored rows of its own share of every micro-batch.
    teacher = {"sft": [], "kd": KD, "stored": [*KD, "distill.teacher_outputs=stored", "distill.top_k=4"]}[supervision]
    args = [*RUN, "trainer.max_steps=20", f"teachers.cache_dir={tmp_path / 'cache'}", *teacher]
    # Started together: the teachers (and stores) are built once, by whichever process locks them first.
    one = subprocess.Popen([CLPD, "train", *args, "trainer.num_threads=1", f"hydra.run.dir={tmp_path / 'one'}"],
                           cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    two = torchrun(*args, f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path)
    one, two = finished(one), finished(two)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr

    single, ranked = metrics(tmp_path / "one"), metrics(tmp_path / "two")  # rank 0 alone wrote the log
    assert [r.get("event") for r in ranked] == [r.get("event") for r in single]
    steps = [(a, b) for a, b in zip(single, ranked) if "loss" in a]
    assert len(steps) == 20
    for a, b in steps:
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert (b["tokens_seen"], b["answer_tokens_seen"], b["teacher"]) == (a["tokens_seen"], a["answer_tokens_seen"], a["teacher"])
        if supervision != "sft":
            # metrics.jsonl rounds to 6 decimals: a small KD term (0.0746) can differ in its last digit
            for term in ("ce", "kd"):
                assert b[term] == pytest.approx(a[term], rel=1e-5, abs=2e-6)
    if supervision != "sft":  # built once: by one process, and under torchrun by rank 0 before the other looked
        assert sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir()
                      if not p.name.startswith(".") and p.name != "outputs") == ["a", "b", "c"]
        assert [e["to"] for e in ranked if e.get("event") == "teacher_switch"] == ["a", "b", "c"]
    assert json.loads((tmp_path / "two" / "status.json").read_text()) == {"status": "ok"}
    assert not (tmp_path / "outputs").exists()  # every rank wrote into the one run dir


def worker_pids(agent: int) -> dict:
    """{rank: pid} of the workers torchrun started (its children that carry a RANK)."""
    found = {}
    children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    for pid in children:
        env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
                   if "=" in item)
        if "RANK" in env:
            found[int(env["RANK"])] = int(pid)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_rank_stops_both_with_one_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    args = [*RUN, "trainer.max_steps=150", "trainer.eval_at_end=false"]
    # The uninterrupted reference runs beside the run that is stopped (tiny models leave cores idle).
    reference = torchrun(*args, f"hydra.run.dir={tmp_path / 'reference'}", cwd=tmp_path)
    run = tmp_path / "run"
    process = torchrun(*args, f"hydra.run.dir={run}", cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = worker_pids(process.pid)
    assert sorted(workers) == [0, 1]
    os.kill(workers[1], signal.SIGTERM)  # not rank 0: the one that writes must hear of it from the other
    stopped = finished(process)
    assert stopped.returncode != 0
    lines = [line for line in stopped.stderr.splitlines() if line.startswith("clpd train: stopped by SIGTERM")]
    assert len(lines) == 1, stopped.stderr  # rank 0 speaks for the run
    step = int(lines[0].split("after step ")[1].split(";")[0])
    assert 0 < step < 150
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == [f"step-{step:07d}"]
    assert json.loads((run / "status.json").read_text())["status"] == "interrupted"
    reference = finished(reference)
    assert reference.returncode == 0, reference.stderr

    resumed = finished(torchrun(*args, f"hydra.run.dir={run}", "trainer.resume=auto", cwd=tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    final, expected = weights(run / "checkpoints" / "final"), weights(tmp_path / "reference" / "checkpoints" / "final")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    assert metrics(run) == metrics(tmp_path / "reference")


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_in_one_line(monkeypatch):
    import clpd.training.distributed as d

    monkeypatch.setattr(d, "ranks", lambda: d.Ranks(rank=0, world_size=3))
    assert d.check_batch(8, 2) == ("trainer.batch_size=8 must be divisible by trainer.grad_accum * ranks = 2 * 3 under "
                                   "torchrun (each rank takes an equal share of every micro-batch)")
    assert d.check_batch(12, 2) is None
    assert d.check_batch(12, 2, micro_batch_tokens=512).startswith("trainer.micro_batch_tokens=512 cannot be used under "
                                                                    "torchrun")


def test_a_sweep_under_torchrun_is_refused(monkeypatch):
    import clpd.training.distributed as d
    from clpd.errors import ClpdError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ClpdError, match="a sweep \\(-m\\) cannot run under torchrun"):
        d.init_from_env(["-m", "seed=0,1"])
