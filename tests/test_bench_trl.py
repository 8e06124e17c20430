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


@pytest.mark.slow
def test_the_on_policy_arms_sample_alike_and_split_the_step(tmp_path):
    out = tmp_path / "bench.json"
    arms = ["clpd_onpolicy_ga1", "clpd_onpolicy_ga4", "trl_onpolicy_ga1", "trl_onpolicy_ga4"]
    command = [sys.executable, "-m", "clpd.bench.trl", "--on-policy", "--steps", "1", "--rounds", "1",
               "--batch-size", "4", "--train-limit", "64", "--threads", "1", "--retries", "0", "--quiet-wait", "0",
               "--max-new-tokens", "8", "--beta", "0.5", "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(out.read_text())
    summary, runs = report["on_policy"], report["runs"]
    assert sorted(summary) == sorted(arms)  # --arms default: the on-policy arms
    # TRL generates as clpd does: the same settings, and (seeded as clpd seeds a step) the same tokens
    generation = runs["trl_onpolicy_ga1"][0]["trl"]["generation"]
    assert generation["do_sample"] and generation["top_k"] == 0 and generation["top_p"] == 1.0
    assert generation["temperature"] == 1.0 and generation["max_new_tokens"] == 8 and generation["eos_token_id"] == 3
    assert runs["trl_onpolicy_ga1"][0]["trl"]["lmbda"] == 1.0
    assert summary["clpd_onpolicy_ga1"]["same_first_samples_as_twin"]
    calls = {name: s["generate_calls_per_step"] for name, s in summary.items()}
    assert calls == {"clpd_onpolicy_ga1": 1, "clpd_onpolicy_ga4": 1, "trl_onpolicy_ga1": 1, "trl_onpolicy_ga4": 4}
    for name in arms:
        r = runs[name][0]
        assert 0 < r["sampled_per_step"] <= 4 * 8 and r["samples_per_step"] == 4
        assert r["split_s_per_step"]["generate"] > 0 and r["split_s_per_step"]["teacher"] > 0
        assert min(r["split_s_per_step"].values()) >= 0
        assert sum(r["split_s_per_step"].values()) == pytest.approx(r["seconds"])  # one timed step
    clpd = runs["clpd_onpolicy_ga1"][0]
    assert clpd["clpd_sampled"][1:] == [clpd["sampled_tokens"]]  # counted as clpd's own step counts them
    assert "sampled tok/s" in run.stdout and "step 0's sampled tokens" in run.stdout
