"""The sweep scripts of scripts/, run as a user runs them, with tiny models so they take seconds."""

from __future__ import annotations

import csv
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
    return subprocess.run(["bash", str(REPO / "scripts" / name), *overrides], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PATH": path, **env})


@pytest.mark.slow
def test_the_ablation_script_runs_every_arm_for_every_seed_in_parallel_lanes_and_a_relaunch_skips_them(tmp_path):
    overrides = [*TINY_OVERRIDES, *TINY_LADDER_BUILD, f"teachers.cache_dir={tmp_path / 'cache'}"]
    arms = ["sft", "clpd"]  # two of the five, to keep this test short
    env = {"JOBS": "2", "SEEDS": "0,1", "OUT": "ablation", "ARMS": ",".join(arms)}
    first = script("reproduce_ablation.sh", *overrides, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    out = tmp_path / "ablation"
    assert "2 lanes of OMP_NUM_THREADS=1" in first.stdout
    assert sorted(p.name for p in out.glob("lane-*.log")) == ["lane-0.log", "lane-1.log"]
    with (out / "report.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted((a, s) for a in arms for s in ("0", "1"))
    assert {r["status"] for r in runs} == {"completed"}
    assert (out / "report.md").exists() and (out / "report.png").exists()
    assert sorted(str(p.parent.relative_to(out)) for p in out.glob("runs/*/*/summary.json")) == [
        f"runs/seed{s}/{a}" for s in (0, 1) for a in sorted(arms)]

    again = script("reproduce_ablation.sh", *overrides, env=env, cwd=tmp_path)
    assert again.returncode == 0
    lanes = "".join((out / f"lane-{i}.log").read_text() for i in (0, 1))
    assert lanes.count("already finished (trainer.resume=auto): nothing to resume") == 4
