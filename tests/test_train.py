"""`run_train` and `run_eval` in-process on tiny models: what a run writes, and on which data."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from clpd.config.schema import to_object
from clpd.errors import ClpdError
from clpd.commands.eval import run_eval
from clpd.commands.run_train import run_train
from tests.conftest import GPT2_DIR, GSM8K_DIR, SVAMP_DIR, TINY_OVERRIDES, compose_config, needs

QUIET = Console(quiet=True)


def test_a_run_writes_metrics_summary_status_and_a_checkpoint_with_its_config(tiny_train_cfg, tmp_path):
    summary = run_train(tiny_train_cfg, tmp_path, QUIET)
    assert summary["steps"] == 3 and summary["tokens_seen"] > summary["answer_tokens_seen"] > 0
    assert json.loads((tmp_path / "status.json").read_text()) == {"status": "ok"}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    # what a bit-for-bit rerun has to match: the thread count changes the summation order
    env = summary["environment"]
    assert (env["torch"], env["threads"], env["device"]) == (torch.__version__, torch.get_num_threads(), "cpu")
    assert env["cpu"]
    final = tmp_path / "checkpoints" / "final"
    assert {"config.json", "tokenizer.json", "clpd_config.yaml"} <= {p.name for p in final.iterdir()}
    assert not (tmp_path / "checkpoints" / "final.tmp").exists()


def test_a_finished_run_dir_is_never_overwritten(tiny_train_cfg, tmp_path):
    run_train(tiny_train_cfg, tmp_path, QUIET)
    before = (tmp_path / "summary.json").read_text()
    with pytest.raises(ClpdError, match="already holds a finished run"):
        run_train(tiny_train_cfg, tmp_path, QUIET)
    assert (tmp_path / "summary.json").read_text() == before


def test_a_failed_run_is_recorded_as_failed(tmp_path):
    cfg = compose_config("train", ["+experiment=arith_sft", *TINY_OVERRIDES, "benchmark=gsm8k",
                                   f"benchmark.data_dir={tmp_path / 'missing'}"])
    with pytest.raises(ClpdError, match="no such folder"):
        run_train(cfg, tmp_path / "run", QUIET)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "missing" in status["error"]


def test_training_on_real_gsm8k_with_a_bpe_tokenizer(tmp_path):
    cfg = compose_config("train", [*TINY_OVERRIDES, "method=sft", "benchmark=gsm8k", f"benchmark.data_dir={needs(GSM8K_DIR)}",
                                   "benchmark.train_limit=16", f"student.tokenizer={needs(GPT2_DIR)}",
                                   "trainer.max_steps=2", "trainer.max_length=256", "trainer.save=false"])
    summary = run_train(cfg, tmp_path, QUIET)
    # One of the first 16 GSM8K problems is longer than 256 GPT-2 tokens: dropped (trainer.overlong=drop).
    assert summary["overlong_examples"] == {"dropped": 1, "truncated": 0}
    assert summary["train_examples"] == 15 and summary["checkpoint"] is None


def test_eval_of_a_trained_checkpoint_on_arith_and_on_svamp(tiny_train_cfg, tmp_path):
    run_train(tiny_train_cfg, tmp_path / "run", QUIET)
    final = str(tmp_path / "run" / "checkpoints" / "final")
    arith = run_eval(compose_config("eval", [f"checkpoint={final}", "benchmark.test_size=8", "benchmark.max_steps=2",
                                             "max_new_tokens=4"]), tmp_path / "eval", QUIET)
    assert arith["n"] == 8 and set(arith["by_difficulty"]) <= {"1", "2"}
    assert sum(m["n"] for m in arith["by_difficulty"].values()) == 8
    svamp = run_eval(compose_config("eval", [f"checkpoint={final}", "benchmark=svamp", f"benchmark.data_dir={needs(SVAMP_DIR)}",
                                             "benchmark.eval_limit=4", "max_new_tokens=4"]), tmp_path / "svamp", QUIET)
    assert svamp["n"] == 4 and svamp["benchmark"] == "svamp"


def test_the_default_job_is_clpd_on_arith_with_the_embedded_ladder_and_a_final_evaluation():
    tc = to_object(compose_config("train", []))
    assert (tc.student.name, tc.teachers.name, tc.benchmark.name.value) == ("micro", "arith_tiny", "arith")
    assert tc.teachers.schedule.value == "progressive" and tc.curriculum.order.value == "easy_to_hard"
    assert tc.distill.loss.value == "forward_kl" and tc.trainer.eval_at_end


def test_a_run_evaluates_its_final_student_into_the_run_dir(tmp_path):
    cfg = compose_config("train", ["+experiment=arith_sft", *TINY_OVERRIDES, "trainer.eval_at_end=true"])
    summary = run_train(cfg, tmp_path, QUIET)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert summary["eval"] == metrics and metrics["n"] == 16 and metrics["split"] == "test"
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == 16


def test_eval_every_logs_a_learning_curve(tmp_path):
    cfg = compose_config("train", ["+experiment=arith_sft", *TINY_OVERRIDES, "trainer.max_steps=4",
                                   "trainer.eval_every=2", "trainer.eval_every_limit=5", "trainer.save=false"])
    run_train(cfg, tmp_path, QUIET)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    curve = [line for line in lines if line.get("event") == "eval"]
    assert [(c["step"], c["n"]) for c in curve] == [(2, 5), (4, 5)]
    assert all(0.0 <= c["accuracy_strict"] <= 1.0 for c in curve)
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3, 4]  # training went on after each eval
