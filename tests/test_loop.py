"""The training loop's pieces: schedule, batching, one optimizer step, accumulation, the logged
terms, the training state, determinism."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from rich.console import Console

from clpd.config.enums import LrSchedule
from clpd.config.model import ModelConfig
from clpd.config.schema import TrainerConfig
from clpd.curriculum.sampler import Sampler
from clpd.errors import ClpdError
from clpd.data.batching import answer_token_count, collate, read_token_count
from clpd.training.distributed import Ranks
from clpd.training.batches import Batches
from clpd.training.log import Outputs
from clpd.training.step import Supervision, build_optimizer, optimizer_step, sft_loss
from clpd.training.state import TrainState
from clpd.training.schedule import lr_at, schedule_step
from clpd.training.loop import train
from clpd.data.records import IGNORE_INDEX
from clpd.losses.chunks import cross_entropy_sum
from clpd.losses.distill import distill_loss
from clpd.models.load import load_model, load_tokenizer
from clpd.teachers.live import TeacherPool

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
    assert set(batch) == {"input_ids", "targets"}  # no attention mask: see the next test


def test_right_padded_rows_need_no_attention_mask_in_a_causal_model():
    """What collate relies on: without a mask, a padded row's logits at its real positions are the
    example's own (padding comes after them, and a causal model never looks ahead)."""
    tokenizer = load_tokenizer(SPEC)
    torch.manual_seed(0)
    model = load_model(SPEC, tokenizer).eval()
    data = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (9, 4, 6)]
    batch = collate(data, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"]).logits
        for row, e in enumerate(data):
            alone = model(input_ids=torch.tensor([e["input_ids"][:-1]])).logits[0]
            assert torch.allclose(padded[row, :len(alone)], alone, atol=1e-5)


def test_the_token_counts_are_those_of_the_collated_batch_without_collating_it():
    data = examples(7)
    batch = collate(data, pad_id=0)
    assert read_token_count(data) == sum(len(e["input_ids"]) - 1 for e in data)  # padding and last tokens predict nothing
    assert answer_token_count(data) == int((batch["targets"] != IGNORE_INDEX).sum())


def test_the_ranks_together_see_the_single_process_batch_and_its_counts(monkeypatch):
    import clpd.training.batches

    data = examples(16)
    batches = Batches(data, Sampler(range(16), 8, seed=0), pad_id=0)
    whole = batches.step(3, 3, micro_size=4)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(clpd.training.batches, "ranks", lambda rank=rank: Ranks(rank=rank, world_size=2))
        shares.append(batches.step(3, 3, micro_size=4))
    assert [len(mb["input_ids"]) for mb in whole.micro_batches] == [4, 4]
    assert all(len(mb["input_ids"]) == 2 for share in shares for mb in share.micro_batches)
    for share in shares:  # every rank counts the whole step: the loss is divided by the same number
        assert (share.tokens, share.answer_tokens, share.examples) == (whole.tokens, whole.answer_tokens, whole.examples)
    # each example's scored targets (padding widths differ between the shares and the whole)
    rows = lambda b: sorted(tuple(t[t != IGNORE_INDEX].tolist()) for mb in b.micro_batches for t in mb["targets"])  # noqa: E731
    assert sorted(rows(shares[0]) + rows(shares[1])) == rows(whole)


def test_cross_entropy_ignores_masked_targets():
    logits = torch.randn(1, 3, 5)
    full = cross_entropy_sum(logits, torch.tensor([[1, 2, 3]]))
    masked = cross_entropy_sum(logits, torch.tensor([[1, IGNORE_INDEX, 3]]))
    direct = -(torch.log_softmax(logits, -1)[0, 0, 1] + torch.log_softmax(logits, -1)[0, 2, 3])
    assert masked == pytest.approx(direct.item(), rel=1e-5) and masked < full


def run_loop(model, data, cfg: TrainerConfig, metrics_path, *, seed: int = 0, supervision: Supervision | None = None,
             packed: bool = False, **outputs):
    """The loop on ``data`` in the given order, on the CPU, quietly."""
    batches = Batches(data, Sampler(range(len(data)), cfg.batch_size, seed=seed), pad_id=load_tokenizer(SPEC).pad_token_id,
                      packed=packed)
    return train(model, batches, cfg, supervision or Supervision(), Outputs(metrics_path, Console(quiet=True), **outputs),
                 device=torch.device("cpu"))


def _run(tmp_path, name: str, seed: int = 0, **trainer) -> list[float]:
    cfg = TrainerConfig(**{"max_steps": 4, "batch_size": 8, "warmup_steps": 1, "log_every": 1, **trainer})
    torch.manual_seed(seed)
    model = load_model(SPEC, load_tokenizer(SPEC))
    result = run_loop(model, examples(), cfg, tmp_path / f"{name}.jsonl", seed=seed)
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


# --- one optimizer step --------------------------------------------------------------------------

def _step(micro_batches):
    # SGD: its update is the gradient itself, so float rounding in the sums stays rounding (Adam's
    # first step is about lr * sign(g), which turns a rounding difference in a gradient near 0 into lr).
    torch.manual_seed(0)
    model = load_model(SPEC, load_tokenizer(SPEC))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    answers = sum(int((mb["targets"] != IGNORE_INDEX).sum()) for mb in micro_batches)
    result = optimizer_step(model, optimizer, scaler, micro_batches, answer_tokens=answers, loss_fn=sft_loss,
                            teacher=None, autocast=torch.autocast("cpu", enabled=False), grad_clip=1.0)
    return model, result


def test_two_micro_batches_give_the_update_of_one_batch_of_the_same_examples():
    data = examples(8)
    pad = load_tokenizer(SPEC).pad_token_id
    whole, one = _step([collate(data, pad)])
    split, two = _step([collate(data[:3], pad), collate(data[3:], pad)])
    assert two.loss == pytest.approx(one.loss, rel=1e-6) and two.grad_norm == pytest.approx(one.grad_norm, rel=1e-5)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        assert torch.allclose(a, b, atol=1e-7), name


def test_a_step_with_a_non_finite_loss_leaves_the_weights_alone():
    pad = load_tokenizer(SPEC).pad_token_id
    torch.manual_seed(0)
    model = load_model(SPEC, load_tokenizer(SPEC))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(model, TrainerConfig(), fused=False)
    nan_loss = lambda logits, teacher, targets: sft_loss(logits * float("nan"), teacher, targets)  # noqa: E731
    result = optimizer_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), [collate(examples(4), pad)],
                            answer_tokens=10, loss_fn=nan_loss, teacher=None, autocast=torch.autocast("cpu", enabled=False),
                            grad_clip=1.0)
    assert not result.applied and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())  # nothing carried into the next step


def test_a_mixed_loss_logs_its_ce_and_kd_terms_beside_the_total(tmp_path):
    tok = load_tokenizer(SPEC)
    teacher_spec = ModelConfig(name="teacher", hidden_size=48, num_layers=1, num_heads=2, intermediate_size=96,
                               max_position_embeddings=64)
    supervision = Supervision(functools.partial(distill_loss, loss="forward_kl", alpha=0.5, vocab_size=len(tok)),
                              TeacherPool([teacher_spec], tok, device=torch.device("cpu"), dtype=torch.float32),
                              schedule=lambda step: 0)
    torch.manual_seed(0)
    cfg = TrainerConfig(max_steps=3, batch_size=8, warmup_steps=1, log_every=1)
    run_loop(load_model(SPEC, tok), examples(), cfg, tmp_path / "m.jsonl", supervision=supervision)
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["ce"] > 0 and r["kd"] > 0
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"], abs=2e-6)  # each rounded to 6 digits
    assert lines[0] == {"event": "teacher_switch", "step": 0, "from": None, "to": "teacher"}


def test_a_pure_loss_logs_no_terms(tmp_path):
    _run(tmp_path, "sft", max_steps=2)
    lines = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert all("ce" not in r and "kd" not in r for r in lines)


# --- the training state ---------------------------------------------------------------------------

def test_the_state_round_trips_through_its_saved_dict_without_the_checkpoint_it_came_from():
    state = TrainState(step=3, tokens_seen=10, answer_tokens_seen=4, teacher=1, optimizer={"a": 1}, scaler={},
                       rng={"torch": 0}, checkpoint="/run/checkpoints/step-3")
    saved = state.to_dict()
    assert "checkpoint" not in saved
    assert TrainState.from_dict(saved, "/elsewhere") == TrainState(**{**saved, "checkpoint": "/elsewhere"})


def test_a_state_written_before_train_state_existed_is_read():
    old = {"step": 5, "schedule_step": 5, "tokens_seen": 100, "answer_tokens_seen": 40, "skipped_steps": 0,
           "teacher_switches": [], "teacher": None, "train_time_s": 1.5, "next_lr": 0.1,
           "sampler": {"seed": 0, "next_step": 5}, "optimizer": {}, "scaler": {}, "rng": {}}
    state = TrainState.from_dict(old, "ckpt")
    assert (state.step, state.tokens_seen, state.train_time_s, state.checkpoint) == (5, 100, 1.5, "ckpt")


def test_a_state_lacking_a_field_is_refused_in_one_line():
    with pytest.raises(ClpdError, match=r"^checkpoint ckpt: its training state lacks rng; .*cannot be resumed from$"):
        TrainState.from_dict({name: 0 for name in TrainState.SAVED if name != "rng"}, "ckpt")
