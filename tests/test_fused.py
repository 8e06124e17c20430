"""The fused output layer and loss (clpd.losses.fused): given the answer rows' hidden states and the
output matrix instead of their logits, every loss is the unfused one (value and gradients w.r.t.
the hidden states and the output matrix) to fp32 rounding, however the rows are chunked."""

from __future__ import annotations

import pytest
import torch

import clpd.losses.fused as fused
from clpd.losses.distill import distill_loss
from clpd.losses.divergences import DIVERGENCES
from clpd.losses.fused import HeadRows
from clpd.losses.sparse import top_k_outputs

N, H, V = 37, 16, 53  # answer rows, hidden size, vocabulary rows


def inputs(seed: int = 0, teacher_rows: int = V):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.7  # logits of std ~3: peaked distributions
    teacher = HeadRows(torch.randn(N, H + 3, generator=g), torch.randn(teacher_rows, H + 3, generator=g) * 0.7)
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, teacher, targets


def loss_and_grads(hidden, weight, teacher, targets, *, fuse: bool, **knobs):
    """The loss and its gradients w.r.t. hidden states and output matrix, fused or through full logits."""
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    student = HeadRows(h, w) if fuse else h @ w.T
    terms = distill_loss(student, teacher, targets, **knobs)
    terms.total.backward()
    return terms, h.grad, w.grad


def dense(teacher: HeadRows) -> torch.Tensor:
    return teacher.hidden @ teacher.weight.T


def assert_same(fused_out, plain_out):
    (f_terms, f_h, f_w), (p_terms, p_h, p_w) = fused_out, plain_out
    for name in ("total", "ce", "kd"):
        a, b = getattr(f_terms, name), getattr(p_terms, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    for a, b in ((f_h, p_h), (f_w, p_w)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.fixture(params=["one chunk", "row chunks", "row chunks and vocabulary slices"])
def chunking(request, monkeypatch):
    """All rows in one chunk, or row chunks of 8 (5 chunks of 37 rows), each whole or in vocabulary
    slices of 7 rows (8 slices of 53; stored top-k outputs are not sliced)."""
    if request.param != "one chunk":
        monkeypatch.setattr(fused, "RECOMPUTE_ABOVE", 0)
    return {"chunk_size": 8, **({"slice_size": 7} if request.param.endswith("slices") else {})}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("loss", sorted(DIVERGENCES))
def test_every_divergence_against_a_live_teacher_equals_the_unfused_loss(loss, temperature, chunking):
    hidden, weight, teacher, targets = inputs()
    knobs = dict(loss=loss, alpha=0.3, temperature=temperature, **chunking)
    # The teacher's rows fused too (its logits made chunk by chunk), or handed in as full logits.
    for given in (teacher, dense(teacher)):
        assert_same(loss_and_grads(hidden, weight, given, targets, fuse=True, **knobs),
                    loss_and_grads(hidden, weight, dense(teacher), targets, fuse=False, **knobs))


@pytest.mark.parametrize("loss", sorted(DIVERGENCES))
def test_every_divergence_against_stored_top_k_equals_the_unfused_loss(loss, chunking):
    hidden, weight, teacher, targets = inputs(1)
    for k in (5, V):  # a tail bucket, and none
        top = top_k_outputs(dense(teacher), k, V)
        for temperature in (0.5, 1.0, 2.0):
            knobs = dict(loss=loss, alpha=0.0, temperature=temperature, **chunking, vocab_size=V)
            assert_same(loss_and_grads(hidden, weight, top, targets, fuse=True, **knobs),
                        loss_and_grads(hidden, weight, top, targets, fuse=False, **knobs))


def test_cross_entropy_alone_equals_the_unfused_loss(chunking):
    hidden, weight, _, targets = inputs(2)
    assert_same(loss_and_grads(hidden, weight, None, targets, fuse=True, loss="sft", alpha=1.0, **chunking),
                loss_and_grads(hidden, weight, None, targets, fuse=False, loss="sft", alpha=1.0, **chunking))


@pytest.mark.parametrize("alpha, gold", [(0.0, True), (0.5, True), (1.0, True), (0.5, False)])
def test_each_mix_of_the_two_terms_and_sampled_targets_equals_the_unfused_loss(alpha, gold, chunking):
    hidden, weight, teacher, targets = inputs(3)
    knobs = dict(loss="forward_kl", alpha=alpha, **chunking, gold=gold)
    assert_same(loss_and_grads(hidden, weight, teacher, targets, fuse=True, **knobs),
                loss_and_grads(hidden, weight, dense(teacher), targets, fuse=False, **knobs))


@pytest.mark.parametrize("slices", [None, 10], ids=["whole rows", "vocabulary slices"])
def test_a_teacher_with_more_output_rows_is_compared_on_the_shared_ones(slices):
    hidden, weight, teacher, targets = inputs(4, teacher_rows=V + 11)  # padded output matrix (Qwen2.5 sizes differ so)
    for knobs in (dict(loss="forward_kl", alpha=0.0, slice_size=slices),
                  dict(loss="jsd", alpha=0.2, vocab_size=V - 3, slice_size=slices)):
        assert_same(loss_and_grads(hidden, weight, teacher, targets, fuse=True, **knobs),
                    loss_and_grads(hidden, weight, dense(teacher), targets, fuse=False, **knobs))


@pytest.mark.parametrize("slices", [None, 10], ids=["whole rows", "vocabulary slices"])
def test_without_grad_the_fused_loss_only_measures(slices):
    hidden, weight, teacher, targets = inputs(5)
    with torch.no_grad():
        terms = distill_loss(HeadRows(hidden, weight.requires_grad_(True)), teacher, targets, loss="reverse_kl", alpha=0.5,
                             slice_size=slices)
    reference = distill_loss(hidden @ weight.detach().T, dense(teacher), targets, loss="reverse_kl", alpha=0.5)
    assert not terms.total.requires_grad
    torch.testing.assert_close(terms.total, reference.total, rtol=1e-5, atol=0)


# --- through a model -----------------------------------------------------------------------------

def tiny_llama(seed: int, tied: bool, vocab: int = 50):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)


def model_batch(vocab: int = 50):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a padded row
    targets = torch.full_like(ids, -100)
    targets[:, 6:] = torch.randint(0, vocab, (3, 6), generator=g)  # the answer positions
    return {"input_ids": ids, "attention_mask": mask}, targets


def step_grads(student, teacher, *, fuse: bool, slice_size=None) -> dict:
    """One micro-batch's loss as the training step takes it (answer positions only), and the
    gradient of every trainable parameter."""
    from clpd.teachers.live import LiveTeacher
    from clpd.training.head import head_rows

    batch, targets = model_batch()
    keep = targets != -100
    batch = {**batch, "logits_to_keep": keep, "use_cache": False}
    student.zero_grad(set_to_none=True)
    teacher_out = LiveTeacher(teacher, fused=fuse).logits(batch, None, torch.autocast("cpu", enabled=False))
    rows = head_rows(student, batch) if fuse else student(**batch).logits
    terms = distill_loss(rows, teacher_out, targets[keep], loss="forward_kl", alpha=0.4, slice_size=slice_size)
    terms.total.backward()
    return {"loss": terms.total.detach(), **{n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}}


@pytest.mark.parametrize("slices", [None, 16], ids=["whole rows", "vocabulary slices"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied embeddings", "untied"])
def test_a_models_fused_step_gives_every_parameter_the_unfused_gradient(tied, slices):
    student, teacher = tiny_llama(0, tied), tiny_llama(1, not tied).requires_grad_(False)
    fused_grads, plain = step_grads(student, teacher, fuse=True, slice_size=slices), step_grads(student, teacher, fuse=False)
    assert fused_grads.keys() == plain.keys() and ("model.embed_tokens.weight" in plain)
    assert ("lm_head.weight" in plain) == (not tied)
    for name in plain:  # within 1e-6 of each tensor's largest entry: slices sum the softmax in another order
        torch.testing.assert_close(fused_grads[name], plain[name], rtol=1e-5,
                                   atol=max(1e-7, 1e-6 * float(plain[name].abs().max())), msg=name)
    # the output layer is the model's own again afterwards
    batch, _ = model_batch()
    assert student(**batch).logits.shape[-1] == 50


def test_lora_on_the_output_layer_gets_the_unfused_gradients():
    from peft import LoraConfig, get_peft_model

    from clpd.training.head import why_not_fused

    torch.manual_seed(3)
    student = get_peft_model(tiny_llama(0, tied=False), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                   target_modules=["q_proj", "lm_head"]))
    for name, p in student.named_parameters():  # B starts at zero: give the adapters weights of their own
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert why_not_fused(student) is None
    teacher = tiny_llama(1, tied=True).requires_grad_(False)
    fused_grads, plain = step_grads(student, teacher, fuse=True), step_grads(student, teacher, fuse=False)
    assert any("lm_head.lora_A" in n for n in plain) and not any(n.endswith("lm_head.base_layer.weight") for n in plain)
    for name in plain:
        torch.testing.assert_close(fused_grads[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_model_whose_logits_are_not_its_output_layer_alone_is_not_fused():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from clpd.training.head import why_not_fused

    assert "not one of the causal LMs" in why_not_fused(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)))
    dropped = get_peft_model(tiny_llama(0, tied=False), LoraConfig(r=2, lora_dropout=0.1, target_modules=["lm_head"]))
    assert "dropout" in why_not_fused(dropped)


# --- a run ---------------------------------------------------------------------------------------

def test_a_fused_run_follows_the_unfused_run_with_a_live_teacher_and_with_stored_outputs(tmp_path):
    import json

    from rich.console import Console

    from clpd.commands.run_train import run_train
    from tests.test_teacher_store import kd_cfg

    for source, extra in (("live", ()), ("stored", ("distill.teacher_outputs=stored", "distill.top_k=4"))):
        for name, setting in (("fused", "true"), ("unfused", "false")):  # one ladder, in tmp_path's cache
            run_train(kd_cfg(tmp_path, *extra, "trainer.max_steps=6", f"trainer.fused_loss={setting}"),
                      tmp_path / source / name, Console(quiet=True))
        losses = [[json.loads(line)["loss"] for line in (tmp_path / source / name / "metrics.jsonl").read_text().splitlines()
                   if "loss" in json.loads(line)] for name in ("fused", "unfused")]
        assert len(losses[0]) == 6
        torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=0, msg=source)


def test_fused_is_the_default_from_a_real_vocabulary_on_and_refused_where_the_model_does_not_allow_it():
    from types import SimpleNamespace

    from clpd.commands.run_train import choose_fused
    from clpd.errors import ClpdError
    from clpd.training.head import FUSED_MIN_ROWS

    def run(setting):
        return SimpleNamespace(tc=SimpleNamespace(trainer=SimpleNamespace(fused_loss=setting)))

    small, real = tiny_llama(0, tied=True, vocab=100), tiny_llama(0, tied=True, vocab=FUSED_MIN_ROWS)
    assert [choose_fused(run(None), small), choose_fused(run(None), real)] == [False, True]
    assert choose_fused(run(True), small) and not choose_fused(run(False), real)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=FUSED_MIN_ROWS))
    assert not choose_fused(run(None), gpt2)
    with pytest.raises(ClpdError, match="trainer.fused_loss=true: the student's logits cannot be fused"):
        choose_fused(run(True), gpt2)
