"""``python -m clpd.bench.trl``, run as a user runs it, on a tiny budget. TRL is not a dependency of clpd
(CI does not install it): skipped where it is missing."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                                reason="trl is not installed (the benchmark's own requirement: pip install trl)")


@pytest.mark.slow
def test_the_trl_harness_gives_both_loops_the_same_examples_and_they_make_the_same_updates(tmp_path):
    out = tmp_path / "bench.json"
    arms = ["clpd_ga4", "trl_ga4_sorted"]
    command = [sys.executable, "-m", "clpd.bench.trl", "--steps", "1", "--rounds", "1",
               "--batch-size", "4", "--train-limit", "64", "--threads", "1", "--retries", "0", "--quiet-wait", "0",
               "--arms", ",".join(arms), "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    summary, runs = report["summary"], report["runs"]
    assert sorted(summary) == sorted(arms)
    clpd, trl = runs["clpd_ga4"][0], runs["trl_ga4_sorted"][0]
    assert clpd["real_tokens"] == trl["real_tokens"] > 0  # the same examples in the timed steps
    assert trl["trl"]["lmbda"] == 0.0 and trl["trl"]["beta"] == 0.0 and not trl["trl"]["activation_checkpointing"]
    # the same loss, normalisation and optimizer: the trained students score the probe batch alike
    assert clpd["probe_kd"] == pytest.approx(trl["probe_kd"], rel=1e-4)
    assert summary["trl_ga4_sorted"]["ratio_to_best_trl"] == 1.0
    assert "real tok/s" in run.stdout and "x best TRL" in run.stdout
