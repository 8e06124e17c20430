"""The paper-scale preset, checked offline: compose +experiment=gsm8k, swap in tiny Qwen2-architecture
stand-ins through model-path overrides, and run two distillation steps on the real GSM8K file."""

from __future__ import annotations

import json

from rich.console import Console

from clpd.config.model import ModelConfig
from clpd.config.schema import to_object
from clpd.models.load import load_model, load_tokenizer
from clpd.commands.plan import run_plan
from clpd.commands.run_train import run_train
from tests.conftest import GPT2_DIR, GSM8K_DIR, compose_config, needs

QUIET = Console(quiet=True)


def stand_in(folder, hidden: int, layers: int, vocab_rows: int):
    """A tiny random Qwen2 saved like a hub model (weights + tokenizer); GPT-2's tokenizer stands
    in for Qwen's, and the output rows are padded past it like Qwen2.5's (151936 / 152064)."""
    spec = ModelConfig(name=folder.name, arch="qwen2", tokenizer=str(needs(GPT2_DIR)), hidden_size=hidden,
                       num_layers=layers, num_heads=2, num_kv_heads=1, intermediate_size=2 * hidden,
                       max_position_embeddings=512, vocab_size=vocab_rows)
    tokenizer = load_tokenizer(spec)
    load_model(spec, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_the_preset_targets_the_paper_setting():
    tc = to_object(compose_config("train", ["+experiment=gsm8k"]))
    assert tc.student.path == "Qwen/Qwen2.5-0.5B-Instruct" and tc.student.lora.enabled
    assert [t.path for t in tc.teachers.ladder] == [f"Qwen/Qwen2.5-{s}-Instruct" for s in ("1.5B", "3B", "7B")]
    assert (tc.benchmark.name.value, tc.curriculum.difficulty.value, tc.curriculum.pacing.value) == ("gsm8k", "cot_steps", "root")
    assert tc.teachers.schedule.value == "progressive" and tc.trainer.precision.value == "auto"


def test_two_steps_with_tiny_stand_ins(tmp_path):
    paths = {"student.path": stand_in(tmp_path / "student", 16, 1, 50304),
             "teachers.ladder.0.path": stand_in(tmp_path / "t1", 16, 1, 50304),
             "teachers.ladder.1.path": stand_in(tmp_path / "t2", 24, 1, 50304),
             "teachers.ladder.2.path": stand_in(tmp_path / "t3", 32, 2, 50368)}
    cfg = compose_config("train", ["+experiment=gsm8k", *[f"{k}={v}" for k, v in paths.items()],
                                   f"benchmark.data_dir={needs(GSM8K_DIR)}", "benchmark.train_limit=48",
                                   "benchmark.eval_limit=4", "trainer.max_steps=2", "trainer.batch_size=4",
                                   "trainer.grad_accum=2", "trainer.max_length=256", "trainer.eval_max_new_tokens=8",
                                   "trainer.log_every=1"])
    summary = run_train(cfg, tmp_path / "run", QUIET)
    assert summary["steps"] == 2 and summary["eval"]["n"] == 4
    assert (tmp_path / "run" / "checkpoints" / "final" / "adapter_config.json").exists()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert all(line["loss"] == line["loss"] for line in lines) and lines[0]["pool"] < 48  # easy first


def test_plan_of_the_preset_works_offline(tmp_path):
    plan = run_plan(compose_config("train", ["+experiment=gsm8k", f"benchmark.data_dir={needs(GSM8K_DIR)}"]),
                    tmp_path, QUIET)
    assert plan["n"] == 7473 and plan["teachers"] == ["qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b"]
    assert len(plan["steps"]) == 700 and plan["steps"][0]["pool"] < plan["steps"][-1]["pool"] == 7473
