"""Padding-free micro-batches: the same examples in one row give the loss and gradients of the
padded batch, for SFT and every divergence; micro-batches by a token budget; the layout never
changes which examples a step sees."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from clpd.config.model import ModelConfig
from clpd.config.schema import TrainerConfig
from clpd.data.batching import (answer_token_count, collate, cut_by_tokens, pack, packing_is_exact, position_count,
                                read_token_count)
from clpd.losses.divergences import DIVERGENCES
from clpd.data.records import IGNORE_INDEX
from clpd.losses.distill import distill_loss
from clpd.models.load import load_model, load_tokenizer
from tests.conftest import TINY_OVERRIDES, compose_config
from tests.test_loop import SPEC, examples, run_loop

TEACHER = ModelConfig(name="teacher", hidden_size=48, num_layers=2, num_heads=2, intermediate_size=96,
                      max_position_embeddings=64)


def _forward(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "targets"}
    if "position_ids" in inputs:
        inputs["use_cache"] = False
    return model(**inputs).logits


def test_pack_puts_each_example_shifted_on_its_own_into_one_row_with_restarting_positions():
    data = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    row = pack(data)
    assert row["input_ids"].tolist() == [[5, 6, 8]]
    assert row["position_ids"].tolist() == [[0, 1, 0]]
    assert row["targets"].tolist() == [[6, 7, 9]]
    assert "attention_mask" not in row


def test_both_layouts_score_the_same_targets_and_count_the_same_tokens():
    data = examples(9)
    padded, packed = collate(data, pad_id=0), pack(data)
    scored = lambda b: sorted(b["targets"][b["targets"] != IGNORE_INDEX].tolist())  # noqa: E731
    assert scored(padded) == scored(packed)
    assert answer_token_count(data) == int((packed["targets"] != IGNORE_INDEX).sum())
    assert read_token_count(data) == packed["input_ids"].numel() == position_count(data, packed=True)
    assert position_count(data, packed=False) == padded["input_ids"].numel()


@pytest.mark.parametrize("loss", ["sft", *DIVERGENCES])
def test_a_packed_micro_batch_gives_the_padded_loss_and_gradients(loss):
    tok = load_tokenizer(SPEC)
    torch.manual_seed(0)
    student, teacher = load_model(SPEC, tok), load_model(TEACHER, tok).eval()
    data = examples(6)
    loss_fn = functools.partial(distill_loss, loss=loss, alpha=0.3 if loss != "sft" else 0.0, vocab_size=len(tok))
    results = []
    for batch in (collate(data, tok.pad_token_id), pack(data)):
        student.zero_grad()
        with torch.no_grad():
            teacher_logits = _forward(teacher, batch)
        total = loss_fn(_forward(student, batch), teacher_logits, batch["targets"]).total
        total.backward()
        results.append((total.detach(), [p.grad.clone() for p in student.parameters()]))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    assert packed_loss == pytest.approx(padded_loss.item(), rel=1e-5)
    for a, b in zip(padded_grads, packed_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_packed_run_follows_the_padded_run_step_by_step(tmp_path):
    # 100 steps of the same batches: the curves agree to float noise (sums in another order).
    curves = {}
    for packed in (False, True):
        torch.manual_seed(0)
        model = load_model(SPEC, load_tokenizer(SPEC))
        cfg = TrainerConfig(max_steps=100, batch_size=8, grad_accum=2, warmup_steps=5, log_every=1, lr=1e-2)
        result = run_loop(model, examples(), cfg, tmp_path / f"{packed}.jsonl", packed=packed)
        curves[packed] = [r["loss"] for r in result.history]
    worst = max(abs(a - b) / abs(a) for a, b in zip(curves[False], curves[True]))
    assert len(curves[True]) == 100 and worst < 1e-4


def test_the_student_architectures_keep_packed_examples_apart():
    tok = load_tokenizer(SPEC)
    for arch in ("llama", "qwen2"):
        assert packing_is_exact(load_model(ModelConfig(**{**SPEC.__dict__, "arch": arch}), tok))


def test_a_model_that_mixes_packed_examples_is_caught():
    class Leaky(torch.nn.Module):  # attends across the whole row: a cumulative mean over positions
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 4)

        def get_input_embeddings(self):
            return self.embed

        def forward(self, input_ids, position_ids=None, use_cache=None):
            x = self.embed(input_ids).cumsum(1) / torch.arange(1, input_ids.size(1) + 1).view(1, -1, 1)
            return type("Out", (), {"logits": x})

    assert not packing_is_exact(Leaky())


def test_micro_batches_by_tokens_hold_at_most_the_budget():
    data = sorted(examples(16), key=lambda e: len(e["input_ids"]))
    for packed in (False, True):
        chunks = cut_by_tokens(data, 30, packed)
        assert [e for c in chunks for e in c] == data  # the same examples, in order
        assert all(position_count(c, packed) <= 30 for c in chunks)
        assert all(position_count([*c, n[0]], packed) > 30 for c, n in zip(chunks, chunks[1:]))  # greedy
    assert len(cut_by_tokens(data, 30, True)) <= len(cut_by_tokens(data, 30, False))  # no padding: never more


def test_a_token_budget_smaller_than_the_longest_example_is_refused_before_the_teachers(tmp_path):
    from clpd.errors import ClpdError
    from clpd.commands.run_train import run_train

    cfg = compose_config("train", ["+experiment=arith_kd", *TINY_OVERRIDES, "trainer.micro_batch_tokens=5",
                                   f"teachers.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ClpdError, match=r"^trainer.micro_batch_tokens=5 is smaller than the longest training example "
                                        r"\(\d+ tokens\); allowed: >= \d+, or null"):
        run_train(cfg, tmp_path / "run", None)
    assert not (tmp_path / "cache").exists()


def test_packing_asked_for_on_a_model_that_cannot_is_refused(tmp_path, monkeypatch):
    import clpd.commands.run_train
    from clpd.errors import ClpdError

    monkeypatch.setattr(clpd.commands.run_train, "packing_is_exact", lambda model: False)
    with pytest.raises(ClpdError, match=r"trainer.packing=true: the student's attention \(\w+\) does not keep packed "
                                        r"examples apart .*; allowed: false, or null"):
        clpd.commands.run_train.run_train(compose_config("train", ["+experiment=arith_sft", *TINY_OVERRIDES, "trainer.packing=true"]),
                             tmp_path / "run", None)
    summary = clpd.commands.run_train.run_train(compose_config("train", ["+experiment=arith_sft", *TINY_OVERRIDES]), tmp_path / "auto")
    assert summary["steps"] == 3  # null: padded, with one line saying why
    lines = [json.loads(line) for line in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["positions_per_s"] >= r["tokens_per_s"] for r in lines)
