"""The training loop's pieces: schedule, batching, accumulation, determinism."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from clpd.config import LrSchedule, ModelConfig, TrainerConfig
from clpd.curriculum.sampler import Sampler
from clpd.errors import ClpdError
from clpd.data.batching import collate
from clpd.loop import lr_at, schedule_step, train
from clpd.losses import IGNORE_INDEX, cross_entropy_sum
from clpd.models import load_model, load_tokenizer

SPEC = ModelConfig(name="t", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64)


def examples(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = 6 + i % 5
        ids = torch.randint(4, 90, (length,), generator=g).tolist()
        prompt = 3
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "truncated": False})
    return out


@pytest.mark.parametrize("schedule", list(LrSchedule))
def test_lr_warms_up_linearly_then_decays_to_the_floor(schedule):
    cfg = TrainerConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, lr_schedule=schedule)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    after = lrs[10:]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert lrs[-1] == pytest.approx(1.0 if schedule == LrSchedule.constant else 0.1)


def test_collate_right_pads_and_shifts_targets_by_one():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6], [8, 9]]
    assert batch["targets"].tolist() == [[6, 7], [9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 1]]


def test_cross_entropy_ignores_masked_targets():
    logits = torch.randn(1, 3, 5)
    full = cross_entropy_sum(logits, torch.tensor([[1, 2, 3]]))
    masked = cross_entropy_sum(logits, torch.tensor([[1, IGNORE_INDEX, 3]]))
    direct = -(torch.log_softmax(logits, -1)[0, 0, 1] + torch.log_softmax(logits, -1)[0, 2, 3])
    assert masked == pytest.approx(direct.item(), rel=1e-5) and masked < full


def _run(tmp_path, name: str, seed: int = 0, **trainer) -> list[float]:
    cfg = TrainerConfig(**{"max_steps": 4, "batch_size": 8, "warmup_steps": 1, "log_every": 1, **trainer})
    tok = load_tokenizer(SPEC)
    torch.manual_seed(seed)
    model = load_model(SPEC, tok)
    data = examples()
    result = train(model, data, Sampler(range(len(data)), cfg.batch_size, seed=seed), cfg, pad_id=tok.pad_token_id,
                   device=torch.device("cpu"), autocast_dtype=None, metrics_path=tmp_path / f"{name}.jsonl",
                   console=Console(quiet=True))
    return [h["loss"] for h in result.history]


def test_same_seed_gives_identical_losses_on_cpu(tmp_path):
    assert _run(tmp_path, "a") == _run(tmp_path, "b")


def test_gradient_accumulation_normalises_by_the_whole_batch(tmp_path):
    # The same 8 examples per step in one micro-batch or in four: the loss is a mean over the answer
    # tokens of all 8, so the updates (and the logged losses) agree up to float rounding.
    whole = _run(tmp_path, "whole", grad_accum=1)
    split = _run(tmp_path, "split", grad_accum=4)
    assert split == pytest.approx(whole, rel=1e-4)


def test_metrics_jsonl_has_one_line_per_logging_step(tmp_path):
    _run(tmp_path, "m", max_steps=5, log_every=2)
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 5]
    assert {"loss", "lr", "grad_norm", "tokens_seen", "answer_tokens_seen", "tokens_per_s", "elapsed_s"} <= set(lines[0])
    assert lines[-1]["tokens_seen"] > lines[0]["tokens_seen"] > 0


def test_a_token_budget_stops_at_the_budget_and_runs_the_whole_schedule_in_it(tmp_path):
    # max_steps is only the length of the schedules here: the run takes as many optimizer steps as
    # the budget allows, and the learning rate reaches its floor on the last of them.
    _run(tmp_path, "budget", max_steps=4, max_tokens=300, min_lr_ratio=0.1, lr=1.0)
    lines = [json.loads(line) for line in (tmp_path / "budget.jsonl").read_text().splitlines()]
    tokens = [r["tokens_seen"] for r in lines]
    assert tokens[-1] >= 300 > tokens[-2]  # stopped at the first step that reached the budget
    assert len(lines) > 4  # 8 examples of 6..10 tokens a step: more than 4 steps to read 300 tokens
    assert [r["schedule_step"] for r in lines] == sorted(r["schedule_step"] for r in lines)
    assert lines[-1]["schedule_step"] == 3 and lines[-1]["lr"] == pytest.approx(0.1)


def test_the_schedule_step_is_the_share_of_the_token_budget_read():
    cfg = TrainerConfig(max_steps=100, max_tokens=1000)
    assert [schedule_step(7, t, cfg) for t in (0, 10, 505, 999, 5000)] == [0, 1, 50, 99, 99]
    assert schedule_step(7, 505, TrainerConfig(max_steps=100)) == 7  # no budget: the optimizer step


def test_loss_falls_when_repeating_a_small_batch(tmp_path):
    losses = _run(tmp_path, "fit", max_steps=30, lr=1e-2, warmup_steps=0, log_every=1)
    assert losses[-1] < 0.7 * losses[0]


def test_sampler_reproduces_any_step_and_depends_on_the_seed():
    a, b, c = Sampler(range(100), 8, seed=1), Sampler(range(100), 8, seed=1), Sampler(range(100), 8, seed=2)
    assert [a.batch(s) for s in range(5)] == [b.batch(s) for s in reversed(range(5))][::-1]
    assert a.batch(3) != c.batch(3)
    assert len(set(a.batch(0))) == 8  # without replacement when the pool is large enough


def test_tensorboard_logging_writes_event_files_or_says_what_is_missing(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ClpdError, match="needs the tensorboard package: pip install tensorboard"):
            _run(tmp_path, "tb", tensorboard=True)
        return
    _run(tmp_path, "tb", tensorboard=True)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
