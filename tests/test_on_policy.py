"""On-policy distillation (``distill.on_policy``, GKD's lambda): the student answers a share of each
step's prompts itself and the active teacher scores those tokens; the curriculum and the teacher
schedule are untouched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file

from clpd.commands.plan import run_plan
from clpd.commands.run_train import run_train
from clpd.data.batching import prompt_length
from clpd.data.records import IGNORE_INDEX
from clpd.errors import ClpdError
from clpd.evaluation.evaluate import sample_answers
from clpd.losses.distill import distill_loss
from clpd.models.load import load_model, load_tokenizer
from clpd.config.model import ModelConfig
from clpd.training.on_policy import OnPolicy
from tests.test_teacher_store import encoded, kd_cfg

QUIET = Console(quiet=True)


# --- the loss on sampled tokens ------------------------------------------------------------------

def dense_reference(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, *, beta: float, t: float) -> torch.Tensor:
    """GKD's generalized JSD written out over the whole vocabulary in float64, summed over the
    positions with a target, times T^2; beta 0 and 1 are forward and reverse KL (TRL's endpoints)."""
    keep = targets != IGNORE_INDEX
    p_s = F.softmax(student[keep].double() / t, dim=-1)
    p_t = F.softmax(teacher[keep].double() / t, dim=-1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
    if beta == 0.0:
        per_token = kl(p_t, p_s)
    elif beta == 1.0:
        per_token = kl(p_s, p_t)
    else:
        m = beta * p_t + (1 - beta) * p_s
        per_token = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    return per_token.sum() * t ** 2


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_the_divergence_on_sampled_tokens_is_the_dense_formula_without_cross_entropy(beta, t):
    g = torch.Generator().manual_seed(int(beta * 10 + t * 100))
    student = (torch.randn(2, 7, 13, generator=g) * 2).requires_grad_()
    teacher = torch.randn(2, 7, 13, generator=g) * 2
    sampled = torch.randint(0, 13, (2, 7), generator=g)  # the student's own tokens, after a prompt
    sampled[:, :3] = IGNORE_INDEX
    alpha = 0.3  # the CE weight: no CE on sampled tokens, the divergence keeps its weight 1 - alpha
    terms = distill_loss(student, teacher, sampled, loss="jsd", alpha=alpha, beta=beta, temperature=t, gold=False)
    assert terms.ce is None
    (grad,) = torch.autograd.grad(terms.total, student)

    reference_student = student.detach().double().requires_grad_()
    expected = (1 - alpha) * dense_reference(reference_student, teacher, sampled, beta=beta, t=t)
    (expected_grad,) = torch.autograd.grad(expected, reference_student)
    torch.testing.assert_close(terms.total.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)
    # the same code as on gold tokens: the KD term is what the off-policy loss computes for these targets
    gold = distill_loss(student, teacher, sampled, loss="jsd", alpha=alpha, beta=beta, temperature=t)
    assert torch.equal(terms.kd, gold.kd)


def test_sampled_targets_without_a_kd_term_are_refused():
    logits = torch.randn(1, 3, 5)
    with pytest.raises(ValueError, match="take the KD term only"):
        distill_loss(logits, logits, torch.zeros(1, 3, dtype=torch.long), loss="forward_kl", alpha=1.0, gold=False)


# --- sampling --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def student():
    tokenizer = load_tokenizer(ModelConfig(name="s"))
    torch.manual_seed(0)
    spec = ModelConfig(name="s", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    return load_model(spec, tokenizer).eval(), tokenizer


def on_policy(tokenizer, max_new_tokens: int = 12, share: float = 0.5, seed: int = 0) -> OnPolicy:
    sample = lambda model, prompts: sample_answers(model, prompts, eos_id=tokenizer.eos_token_id,  # noqa: E731
                                                   pad_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens,
                                                   temperature=1.0, top_p=1.0)
    return OnPolicy(share, seed, sample, tokenizer.eos_token_id)


def test_fixed_seeds_give_the_same_samples_twice_and_leave_the_runs_rng_alone(student):
    model, tokenizer = student
    examples = encoded(6)
    policy = on_policy(tokenizer)
    before = torch.get_rng_state()
    first, stats = policy.answer(model, examples, step=3)
    assert torch.equal(torch.get_rng_state(), before)  # sampling never moves the run's own generator
    second, _ = policy.answer(model, examples, step=3)
    assert first == second
    other, _ = policy.answer(model, examples, step=4)
    assert other != first  # each step samples anew
    assert policy.choose(3, 64).tolist() == policy.choose(3, 64).tolist() != policy.choose(4, 64).tolist()
    assert 16 < policy.choose(3, 64).sum() < 48  # about half

    for example, answered in zip(examples, first):  # the prompt kept, the loss on the sampled tokens
        n = prompt_length(example)
        assert answered["input_ids"][:n] == example["input_ids"][:n] and answered["labels"][:n] == [IGNORE_INDEX] * n
        assert answered["labels"][n:] == answered["input_ids"][n:] and 1 <= len(answered["input_ids"]) - n <= 12
    lengths = [len(a["input_ids"]) - prompt_length(a) for a in first]
    assert stats.samples == 6 and stats.tokens == sum(lengths)
    ended = [a["input_ids"][-1] == tokenizer.eos_token_id for a in first]
    assert stats.unfinished == ended.count(False) and all(n == 12 for n, e in zip(lengths, ended) if not e)


def test_a_sample_ends_at_its_first_eos_or_at_the_budget(student):
    model, tokenizer = student
    prompts = [e["input_ids"][:prompt_length(e)] for e in encoded(8)]
    torch.manual_seed(1)
    answers = sample_answers(model, prompts, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                             max_new_tokens=5, temperature=1.0, top_p=1.0)
    for answer in answers:
        assert 1 <= len(answer) <= 5 and tokenizer.eos_token_id not in answer[:-1]
        assert answer[-1] == tokenizer.eos_token_id or len(answer) == 5


# --- runs ----------------------------------------------------------------------------------------

def final_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "checkpoints" / "final" / "model.safetensors")


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_with_lambda_0_a_run_is_bitwise_the_off_policy_run_whatever_the_sampling_settings(tmp_path):
    run_train(kd_cfg(tmp_path), tmp_path / "off", QUIET)
    run_train(kd_cfg(tmp_path, "distill.on_policy=0", "distill.generation.temperature=0.5",
                     "distill.generation.max_new_tokens=3"), tmp_path / "zero", QUIET)
    a, b = final_weights(tmp_path / "off"), final_weights(tmp_path / "zero")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not any("samples" in row for row in metrics(tmp_path / "zero"))


def test_an_on_policy_run_logs_its_samples_and_both_terms_apart_as_clpd_plan_said(tmp_path):
    overrides = ("distill.on_policy=0.5", "distill.alpha=0.5", "distill.generation.max_new_tokens=8")
    console = Console(record=True, width=200)
    plan = run_plan(kd_cfg(tmp_path, *overrides), tmp_path / "plan", console)
    summary = run_train(kd_cfg(tmp_path, *overrides), tmp_path / "run", QUIET)
    steps = [r for r in metrics(tmp_path / "run") if "loss" in r and "event" not in r]
    assert len(steps) == 4 and summary["steps"] == 4
    assert [r["samples"] for r in steps] == [s["on_policy"] for s in plan["steps"]] and sum(r["samples"] for r in steps) > 0
    printed = console.export_text()
    assert "on-policy" in printed and "each example is the student's own sample with probability 0.5" in printed
    for r in steps:
        assert 0 <= r["unfinished_samples"] <= r["samples"] <= 4  # batch_size 4
        if r["samples"]:
            assert r["kd_sampled"] >= 0 and 1 <= r["sample_length_mean"] <= 8
            assert r["sampled_tokens"] == round(r["sample_length_mean"] * r["samples"])
        if r["samples"] < 4:
            assert r["ce"] > 0 and r["kd"] >= 0  # the gold examples' terms


def test_lambda_1_trains_on_samples_alone(tmp_path):
    run_train(kd_cfg(tmp_path, "distill.on_policy=1", "distill.generation.max_new_tokens=6"), tmp_path / "run", QUIET)
    steps = [r for r in metrics(tmp_path / "run") if "loss" in r and "event" not in r]
    assert all(r["samples"] == 4 and "ce" not in r and r["loss"] == pytest.approx(r["kd_sampled"], rel=1e-5)
               for r in steps)


def test_a_run_with_lambda_half_stopped_and_resumed_ends_with_the_weights_of_the_uninterrupted_one(tmp_path):
    policy = ("distill.on_policy=0.5", "distill.generation.max_new_tokens=8", "trainer.max_steps=6")
    run_train(kd_cfg(tmp_path, *policy), tmp_path / "straight", QUIET)
    run_train(kd_cfg(tmp_path, *policy, "trainer.save_every=3"), tmp_path / "halves", QUIET)
    run_train(kd_cfg(tmp_path, *policy, "trainer.resume=" + str(tmp_path / "halves" / "checkpoints" / "step-0000003")),
              tmp_path / "resumed", QUIET)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(a[n], b[n]) for n in a)
    samples = [[r.get("samples") for r in metrics(tmp_path / d) if "loss" in r and "event" not in r]
               for d in ("straight", "resumed")]
    assert samples[1][-3:] == samples[0][3:] and sum(samples[0]) > 0  # steps 4-6 sample what they sampled unstopped


@pytest.mark.parametrize("extra, message", [
    (["distill.on_policy=1.5"], r"distill.on_policy=1.5 must be in \[0, 1\]"),
    (["distill.on_policy=0.5", "distill=sft"], "distill.on_policy=0.5 trains on the student's samples"),
    (["distill.on_policy=0.5", "distill.alpha=1.0"], "distill.on_policy=0.5 trains on the student's samples"),
    (["distill.on_policy=0.5", "distill.teacher_outputs=stored"], "needs distill.teacher_outputs=live"),
    (["distill.on_policy=0.5", "distill.generation.top_p=0"], r"distill.generation.top_p=0.0 must be in \(0, 1\]"),
    (["distill.on_policy=0.5", "distill.generation.max_new_tokens=0"], "max_new_tokens=0 must be >= 1"),
    (["distill.on_policy=0.5", "distill.generation.max_new_tokens=400", "trainer.micro_batch_tokens=300"],
     "smaller than the longest possible sample"),
])
def test_bad_on_policy_settings_are_refused_before_any_step(tmp_path, extra, message):
    with pytest.raises(ClpdError, match=message):
        run_train(kd_cfg(tmp_path, *extra), tmp_path / "run", QUIET)
    assert not (tmp_path / "run" / "checkpoints").exists()
