"""Bad input and bad luck: each guard refuses (or recovers) with one line that says what happened."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from omegaconf import OmegaConf
from rich.console import Console

from clpd.training.checkpoint import write_checkpoint
from clpd.config.schema import TrainerConfig
from clpd.errors import ClpdError
from clpd.training.step import Supervision, sft_loss
from clpd.losses.distill import LossTerms
from clpd.models.load import load_model, load_tokenizer
from clpd.commands.run_train import run_train
from tests.conftest import TINY_OVERRIDES, compose_config
from tests.test_cli import CLPD, clpd, finished, started
from tests.test_loop import SPEC, examples, run_loop

QUIET = Console(quiet=True)


def _train_with_a_nan_at(tmp_path, bad_step: int, **trainer):
    """Train 6 steps where the loss of step ``bad_step`` (1-based) is nan."""
    cfg = TrainerConfig(**{"max_steps": 6, "batch_size": 4, "grad_accum": 2, "warmup_steps": 1, "log_every": 1, **trainer})
    calls = {"n": 0}

    def loss_fn(logits, teacher_logits, targets):
        calls["n"] += 1
        loss = sft_loss(logits, teacher_logits, targets).total
        return LossTerms(loss * float("nan") if (calls["n"] + 1) // 2 == bad_step else loss)  # 2 micro-batches a step

    torch.manual_seed(0)
    model = load_model(SPEC, load_tokenizer(SPEC))
    data = [{**e, "id": f"p{i}"} for i, e in enumerate(examples())]
    result = run_loop(model, data, cfg, tmp_path / "metrics.jsonl", supervision=Supervision(loss_fn))
    return model, result


def test_a_non_finite_loss_stops_the_run_naming_the_step_the_examples_and_the_last_checkpoint(tmp_path):
    with pytest.raises(ClpdError, match=r"the training loss became nan at step 3 \(examples p\d+, p\d+, p\d+, p\d+\); "
                                        r"no checkpoint was written yet\. .*trainer.skip_nonfinite=true"):
        _train_with_a_nan_at(tmp_path, bad_step=3)


def test_with_skip_nonfinite_the_bad_step_is_skipped_counted_and_the_weights_stay_finite(tmp_path):
    model, result = _train_with_a_nan_at(tmp_path, bad_step=3, skip_nonfinite=True)
    assert result.state.step == 6 and result.state.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (skip,) = [e for e in events if e.get("event") == "skip_nonfinite"]
    assert skip["step"] == 3 and len(skip["examples"]) == 4
    assert math.isfinite(result.final_loss)


def _checkpoint(tmp_path):
    tok = load_tokenizer(SPEC)
    torch.manual_seed(0)
    path = tmp_path / "final"
    write_checkpoint(path, model=load_model(SPEC, tok), tokenizer=tok, cfg=OmegaConf.create({"note": "test"}))
    return path


def _damaged(tmp_path, damage: str):
    path = _checkpoint(tmp_path)
    weights = path / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        (path / "COMPLETE").unlink()
    return path


DAMAGES = ("truncate", "flip", "unmark")


@pytest.fixture(scope="module")
def evaluated_damaged(tmp_path_factory) -> dict:
    """``clpd eval`` of a checkpoint damaged each way, the three started at once: {damage: completed process}."""
    runs = {}
    for damage in DAMAGES:
        tmp = tmp_path_factory.mktemp(damage)
        path = _damaged(tmp, damage)
        runs[damage] = started(CLPD, "eval", f"checkpoint={path}", "benchmark.test_size=4", f"hydra.run.dir={tmp / 'eval'}",
                               cwd=tmp)
    return {damage: finished(run) for damage, run in runs.items()}


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"model.safetensors has \d+ bytes, \d+ were written \(truncated\?\)"),
    ("flip", r"model.safetensors does not match the sha256 written with it"),
    ("unmark", r"is incomplete: it has no COMPLETE marker"),
])
def test_eval_of_a_damaged_checkpoint_is_one_clear_line(evaluated_damaged, damage, message):
    out = evaluated_damaged[damage]
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clpd eval: error: checkpoint") and "Traceback" not in out.stderr
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("override, message", [
    ("benchmark.train_size=0", r"benchmark.train_size=0: the train split \(benchmark.train_split\) would have no "
                               r"problems; allowed: >= 1"),
    ("trainer.max_length=20", r"no training examples left: all 64 are longer than trainer.max_length=20 "
                              r"\(trainer.overlong=drop\); raise trainer.max_length or set trainer.overlong=truncate_left"),
])
def test_an_empty_training_set_is_refused_before_training(tmp_path, override, message):
    cfg = compose_config("train", ["+experiment=arith_sft", *TINY_OVERRIDES, override])
    with pytest.raises(ClpdError, match=message):
        run_train(cfg, tmp_path, QUIET)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_overlong_examples_are_dropped_or_left_truncated_and_counted(tmp_path):
    # These arith examples (1..2 steps) are 104..215 characters, half of them under 137.
    base = ["+experiment=arith_sft", *TINY_OVERRIDES, "trainer.max_length=137", "trainer.save=false"]
    dropped = run_train(compose_config("train", base), tmp_path / "drop", QUIET)
    cut = run_train(compose_config("train", [*base, "trainer.overlong=truncate_left"]), tmp_path / "cut", QUIET)
    n = dropped["overlong_examples"]["dropped"]
    assert 0 < n < 64 and dropped["train_examples"] == 64 - n and dropped["overlong_examples"]["truncated"] == 0
    assert cut["overlong_examples"]["truncated"] > 0
    assert cut["train_examples"] + cut["overlong_examples"]["dropped"] == 64


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_sweep_and_every_job_records_its_status(tmp_path):
    sweep = tmp_path / "sweep"
    out = clpd("train", "-m", "+experiment=arith_sft", *TINY_OVERRIDES, "trainer.max_length=20,512",
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    statuses = [json.loads((sweep / job / "status.json").read_text()) for job in ("0", "1")]
    assert statuses[0]["status"] == "failed" and "no training examples left" in statuses[0]["error"]
    assert statuses[1] == {"status": "ok"} and (sweep / "1" / "checkpoints" / "final").exists()
    assert out.returncode != 0  # the sweep as a whole did not succeed
