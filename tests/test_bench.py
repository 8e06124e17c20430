"""The benchmarks of clpd.bench: run as a user runs them (``python -m clpd.bench.NAME``) at a size of
seconds, and kept to the house rules (short modules and functions, no import-path edits)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from clpd.teachers.compact import Layout
from tests.conftest import REPO
from tests.test_architecture import functions

BENCH = REPO / "clpd" / "bench"
MODULES = sorted(BENCH.glob("*.py"))


def bench(module: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", f"clpd.bench.{module}", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_every_benchmark_module_is_short_and_so_are_its_functions(path):
    assert len(path.read_text().splitlines()) < 400
    assert [(name, n) for name, n, _ in functions(path) if n > 60] == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_benchmark_edits_the_import_path(path):
    tree = ast.parse(path.read_text())
    uses = [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
            and node.value.id == "sys"]
    assert uses == []


def test_the_provenance_hashes_the_code_a_step_runs():
    from clpd.bench.common import measured_files, provenance

    files = measured_files()
    for module in ("clpd/training/step.py", "clpd/training/loop.py", "clpd/training/batches.py",
                   "clpd/data/batching.py"):
        assert module in files
    assert any(name.startswith("clpd/config") for name in files)
    assert any(name.startswith("clpd/losses") for name in files)
    hashes = provenance()["sha256"]
    assert set(hashes) == set(files) and all(len(h) == 16 for h in hashes.values())


def test_rounds_rotate_the_arms_by_one_each_round():
    from clpd.bench.common import rounds

    assert list(rounds(4, ("a", "b", "c"))) == [(0, ["a", "b", "c"]), (1, ["b", "c", "a"]), (2, ["c", "a", "b"]),
                                                (3, ["a", "b", "c"])]
    assert [order for _, order in rounds(3, ["standard_kd", "clpd"])] == [
        ["standard_kd", "clpd"], ["clpd", "standard_kd"], ["standard_kd", "clpd"]]


@pytest.mark.parametrize("argv", [["store", "step"], ["store", "size"], ["store", "build"], ["store", "memory"],
                                  ["store", "largest"], ["store", "onpolicy"],
                                  ["trl"], ["distill"], ["overhead"], ["checkpoint"]])
def test_every_benchmark_answers_help(argv, capsys):
    import importlib

    module = importlib.import_module(f"clpd.bench.{argv[0]}")
    main = module.main
    with pytest.raises(SystemExit) as done:
        main([*argv[1:], "--help"])
    assert done.value.code == 0
    assert f"python -m clpd.bench.{argv[0]}" in capsys.readouterr().out


def test_the_largest_micro_batch_is_found_by_doubling_then_halving_the_gap(monkeypatch, capsys):
    import argparse

    import clpd.bench.store_largest as largest

    tried = []

    def trial(work, arm, store, initial, size, args):  # a GPU on which 45 examples fit and 46 do not
        tried.append(size)
        return None if size > 45 else {"step_s": 1.0, "tokens_per_s": 512.0 * size, "peak_allocated_gib": size / 10}

    monkeypatch.setattr(largest, "trial", trial)
    found = largest.largest(None, "live", None, None, argparse.Namespace(start=8, max_batch=256, refine=2))
    assert tried == [8, 16, 32, 64, 48, 40]
    assert (found["largest"], found["smallest_failed"]) == (40, 48) and found["at_largest"]["peak_allocated_gib"] == 4.0
    everything_fits = largest.largest(None, "sft", None, None, argparse.Namespace(start=8, max_batch=32, refine=2))
    assert (everything_fits["largest"], everything_fits["smallest_failed"]) == (32, None)
    assert "out of memory" in capsys.readouterr().out


def test_the_stored_arm_of_the_trl_benchmark_stores_only_what_its_steps_and_probe_read():
    import argparse

    from clpd.bench.clpd_arm import steps_only
    from clpd.bench.trl_arms import Work

    examples = [{"id": f"e{i}", "input_ids": [i]} for i in range(10)]
    work = Work(examples, step_batches=[[7, 2], [2, 9]], probe=[4, 7], pad_id=0, vocab=5, student_dir="s",
                teacher_dir="t", args=argparse.Namespace())
    cut = steps_only(work)
    assert [e["id"] for e in cut.examples] == ["e2", "e4", "e7", "e9"]
    # the same examples in the same order, step by step, and the same probe
    assert [[cut.examples[i]["id"] for i in b] for b in cut.step_batches] == [["e7", "e2"], ["e2", "e9"]]
    assert [cut.examples[i]["id"] for i in cut.probe] == ["e4", "e7"]


def test_the_on_policy_benchmark_splits_each_step_into_generation_teacher_and_the_rest(tmp_path):
    from clpd.bench.store import main

    main(["onpolicy", "--student", "32,1,2,1,64,300", "--teacher", "48,1,2,1,96,300", "--seq-len", "16",
          "--max-new-tokens", "6", "--batch-size", "4", "--grad-accum", "2", "--rounds", "1", "--steps", "2",
          "--threads", "1", "--json", str(tmp_path / "onpolicy.json")])
    report = json.loads((tmp_path / "onpolicy.json").read_text())
    assert sorted(report["summary"]) == ["onpolicy", "onpolicy_fused"]
    for (run,) in report["runs"].values():
        assert [s["samples"] for s in run["steps"]] == [4, 4]  # every prompt of every timed step answered
        assert all(0 < s["sampled_tokens"] <= 4 * 6 for s in run["steps"])
        assert all(s["generate_s"] > 0 and s["teacher_s"] > 0 for s in run["steps"])
        assert sum(run["split"].values()) == pytest.approx(1.0) and run["split"]["rest"] > 0
        assert run["samples_per_s"] == pytest.approx(8 / sum(s["step_s"] for s in run["steps"]))


@pytest.mark.slow
def test_bench_store_times_every_arm_and_sizes_stores_from_their_files(tmp_path):
    """``python -m clpd.bench.store`` step and size as a user runs them, at a size of seconds (no timing is checked)."""
    out = bench("store", "step", "--preset", "arith", "--rounds", "1", "--steps", "1", "--warmup", "0",
                "--batch-size", "4", "--grad-accum", "2", "--train-limit", "50", "--threads", "1",
                "--json", str(tmp_path / "step.json"))
    step = json.loads((tmp_path / "step.json").read_text())
    assert sorted(step["summary"]) == ["live", "live_fused", "sft", "sft_fused", "stored", "stored_fused"]
    for arm in step["summary"].values():
        assert arm["median_step_s"] > 0 and arm["tokens_per_s"] > 0 and arm["ratio_to_sft"] > 0
        assert arm["steps_applied"] == arm["steps_timed"] == 1
    assert step["ratios"]["live/sft"] > 0 and step["ratios"]["stored/sft"] > 0
    # the store covers the batch: one row per answer token
    assert step["store"]["rows"] == step["workload"]["answer_tokens_per_step"] > 0 and step["store"]["build_s"] > 0
    # the same first student and batch: top-k + tail coarsening can only lower the divergence
    assert 0 < step["summary"]["stored"]["first_loss"] <= step["summary"]["live"]["first_loss"]
    for arm in ("sft", "live", "stored"):  # fused: the same loss of the same first step
        assert step["summary"][f"{arm}_fused"]["first_loss"] == pytest.approx(step["summary"][arm]["first_loss"], rel=1e-5)
        assert step["ratios"][f"{arm}_fused/{arm}"] > 0
    assert "stored/sft" in out

    bench("store", "size", "--vocab", "1000", "--examples", "4", "--ks", "8,32", "--threads", "1",
          "--json", str(tmp_path / "size.json"))
    size = json.loads((tmp_path / "size.json").read_text())
    assert [s["k"] for s in size["stores"]] == [8, 32]
    for s in size["stores"]:
        assert s["rows"] == size["rows"] > 0 and s["formula_bytes_per_token"] == Layout(s["k"], 1000).row_bits / 8
        assert s["bytes_per_token"] > s["formula_bytes_per_token"] and s["formula_matches_files"]
        assert s["bytes_per_token"] < s["format_1_bytes_per_token"] == 8 * s["k"] + 4
        assert s["fp16_bytes_per_token"] == 2000 and s["fp16_over_store"] > 1


@pytest.mark.slow
def test_the_loss_memory_of_each_variant_is_measured_in_its_own_process(tmp_path):
    bench("store", "memory", "--vocab", "2000", "--tokens", "256", "--threads", "1",
          "--json", str(tmp_path / "memory.json"))
    variants = json.loads((tmp_path / "memory.json").read_text())["variants"]
    assert sorted(variants) == ["clpd_live", "clpd_sft", "clpd_stored", "fused_live", "fused_sft", "fused_stored", "naive"]
    assert all(v["peak_mib"] > 0 and v["threads"] == 1 for v in variants.values())
    assert variants["naive"]["ratio_to_naive"] == 1.0
    # the same inputs: live KD is the naive loss, computed on the answer rows only; fused, the same loss
    assert variants["clpd_live"]["loss"] == pytest.approx(variants["naive"]["loss"], rel=1e-4)
    assert variants["fused_live"]["loss"] == pytest.approx(variants["clpd_live"]["loss"], rel=1e-5)
    assert variants["fused_stored"]["loss"] == pytest.approx(variants["clpd_stored"]["loss"], rel=1e-5)
    assert variants["fused_sft"]["loss"] == pytest.approx(variants["clpd_sft"]["loss"], rel=1e-5)
    # vocabulary slices (asked for by name: not in the default set): the fused losses, slice by slice
    bench("store", "memory", "--vocab", "2000", "--tokens", "256", "--threads", "1", "--slice-size", "300",
          "--variants", "sliced_live,sliced_sft", "--json", str(tmp_path / "sliced.json"))
    sliced = json.loads((tmp_path / "sliced.json").read_text())["variants"]
    assert sliced["sliced_live"]["loss"] == pytest.approx(variants["fused_live"]["loss"], rel=1e-5)
    assert sliced["sliced_sft"]["loss"] == pytest.approx(variants["fused_sft"]["loss"], rel=1e-5)


@pytest.mark.slow
def test_the_distillation_benchmark_times_every_phase_of_a_step(tmp_path):
    bench("distill", "--student", "tiny", "--teacher", "tiny-teacher", "--steps", "1", "--warmup", "0",
          "--batch", "2", "--seq-len", "16", "--device", "cpu", "--json", str(tmp_path / "distill.json"))
    result = json.loads((tmp_path / "distill.json").read_text())
    assert set(result["step_pct"]) == {"teacher_forward", "student_forward", "loss", "backward", "optimizer_step"}
    assert result["tokens_per_s"] > 0 and result["first_loss"] > 0 and result["precision"] == "fp32"
