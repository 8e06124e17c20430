"""Distillation losses: the divergences' defining properties, and how kd_loss_sum / distill_loss
turn logits into a summed, chunked, vocabulary-aligned loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clpd.losses import chunks, dense
from clpd.losses.divergences import DIVERGENCES, LOSS_NAMES, forward_kl, jsd, reverse_kl, skew_forward_kl, skew_reverse_kl, tvd
from clpd.data.records import IGNORE_INDEX
from clpd.losses.chunks import answer_rows, cross_entropy_sum
from clpd.losses.distill import distill_loss
from clpd.losses.dense import kd_loss_sum

NAMES = list(DIVERGENCES)
SEEDS = [0, 1, 2]

# Hand-made distributions: p is the teacher, q the student.
P = [0.5, 0.3, 0.2]
Q = [0.25, 0.25, 0.5]


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def logp(probs) -> torch.Tensor:
    return torch.tensor([probs], dtype=torch.float64).log()


def random_logp(seed: int, n: int = 4, v: int = 9, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.log_softmax(torch.randn(n, v, generator=g) * scale, dim=-1)


def batch(seed: int = 0, b: int = 2, t: int = 5, vs: int = 11, vt: int = 11):
    """Student logits (leaf, requires grad), teacher logits and targets with masked prompt/padding."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, t, vs, generator=g) * 2).requires_grad_()
    teacher = torch.randn(b, t, vt, generator=g) * 2
    targets = torch.randint(0, min(vs, vt), (b, t), generator=g)
    targets[0, :2] = IGNORE_INDEX  # prompt
    targets[1, -1] = IGNORE_INDEX  # padding
    return student, teacher, targets


def value_and_grad(student, teacher, targets, **kw):
    student.grad = None
    loss = kd_loss_sum(student, teacher, targets, **kw)
    loss.backward()
    return loss.detach(), student.grad.clone()


# ---------------------------------------------------------------------------------------------
# The divergences
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_every_divergence_is_zero_for_identical_distributions(name):
    for seed in SEEDS:
        x = random_logp(seed)
        assert torch.allclose(DIVERGENCES[name](x, x.clone()), torch.zeros(4), atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_every_divergence_is_positive_for_different_distributions(name):
    for seed in SEEDS:
        assert (DIVERGENCES[name](random_logp(seed), random_logp(seed + 100)) > 0).all()


def test_forward_and_reverse_kl_equal_sum_p_log_p_over_q():
    s, t = logp(Q), logp(P)
    assert forward_kl(s, t).item() == pytest.approx(kl(P, Q), rel=1e-12)  # KL(teacher || student)
    assert reverse_kl(s, t).item() == pytest.approx(kl(Q, P), rel=1e-12)  # KL(student || teacher)
    assert kl(P, Q) == pytest.approx(0.2180, abs=1e-4) and kl(Q, P) == pytest.approx(0.2393, abs=1e-4)


def test_jsd_weights_the_teacher_by_beta_as_in_gkd_eq_1():
    s, t = logp(Q), logp(P)
    for beta in (0.1, 0.3, 0.5, 0.9):
        m = [beta * p + (1 - beta) * q for p, q in zip(P, Q)]
        expected = beta * kl(P, m) + (1 - beta) * kl(Q, m)
        assert jsd(s, t, beta=beta).item() == pytest.approx(expected, rel=1e-12)


def test_jsd_at_half_is_symmetric_and_zero_only_for_identical_distributions():
    for seed in SEEDS:
        a, b = random_logp(seed), random_logp(seed + 100)
        assert torch.allclose(jsd(a, b, beta=0.5), jsd(b, a, beta=0.5), atol=1e-6)
        assert (jsd(a, b, beta=0.5) > 0).all()
        assert torch.allclose(jsd(a, a, beta=0.5), torch.zeros(4), atol=1e-6)


def test_jsd_at_half_is_bounded_by_log_2_and_reaches_it_for_disjoint_supports():
    for seed in SEEDS:
        assert (jsd(random_logp(seed, scale=10), random_logp(seed + 100, scale=10), beta=0.5) <= math.log(2) + 1e-6).all()
    disjoint_s = torch.tensor([[0.0, -math.inf, -math.inf, -math.inf]]).log_softmax(-1)
    disjoint_t = torch.tensor([[-math.inf, 0.0, 0.0, -math.inf]]).log_softmax(-1)
    assert jsd(disjoint_s, disjoint_t, beta=0.5).item() == pytest.approx(math.log(2), abs=1e-6)


def test_jsd_at_the_endpoints_is_forward_and_reverse_kl_as_in_trl():
    s, t = logp(Q), logp(P)
    assert jsd(s, t, beta=0.0).item() == pytest.approx(kl(P, Q), rel=1e-12)
    assert jsd(s, t, beta=1.0).item() == pytest.approx(kl(Q, P), rel=1e-12)


def test_jsd_near_the_endpoints_is_a_scaled_kl_so_the_endpoints_are_a_jump():
    s, t = logp(Q), logp(P)
    eps = 1e-4
    assert jsd(s, t, beta=eps).item() / eps == pytest.approx(kl(P, Q), rel=1e-2)
    assert jsd(s, t, beta=1 - eps).item() / eps == pytest.approx(kl(Q, P), rel=1e-2)


def test_skew_kls_follow_the_distillm_definitions():
    s, t = logp(Q), logp(P)
    lam = 0.1
    skl_mix = [lam * p + (1 - lam) * q for p, q in zip(P, Q)]  # SKL: KL(p || lam p + (1 - lam) q)
    srkl_mix = [(1 - lam) * p + lam * q for p, q in zip(P, Q)]  # SRKL: KL(q || (1 - lam) p + lam q)
    assert skew_forward_kl(s, t, lam=lam).item() == pytest.approx(kl(P, skl_mix), rel=1e-12)
    assert skew_reverse_kl(s, t, lam=lam).item() == pytest.approx(kl(Q, srkl_mix), rel=1e-12)


def test_skew_kls_at_lam_zero_equal_forward_and_reverse_kl():
    for seed in SEEDS:
        s, t = random_logp(seed), random_logp(seed + 100)
        assert torch.allclose(skew_forward_kl(s, t, lam=0.0), forward_kl(s, t))
        assert torch.allclose(skew_reverse_kl(s, t, lam=0.0), reverse_kl(s, t))
        # and tend to them continuously (unlike jsd at its endpoints)
        s, t = s.double(), t.double()
        assert torch.allclose(skew_forward_kl(s, t, lam=1e-9), forward_kl(s, t), atol=1e-5)
        assert torch.allclose(skew_reverse_kl(s, t, lam=1e-9), reverse_kl(s, t), atol=1e-5)


def test_tvd_is_in_the_unit_interval_and_symmetric():
    s, t = logp(Q), logp(P)
    assert tvd(s, t).item() == pytest.approx(0.5 * sum(abs(p - q) for p, q in zip(P, Q)), rel=1e-12)
    for seed in SEEDS:
        a, b = random_logp(seed, scale=10), random_logp(seed + 100, scale=10)
        assert ((tvd(a, b) >= 0) & (tvd(a, b) <= 1)).all()
        assert torch.allclose(tvd(a, b), tvd(b, a))
    one_hot = torch.tensor([[0.0, -math.inf, -math.inf]])
    assert tvd(one_hot, one_hot.roll(1, dims=-1)).item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", NAMES)
def test_divergence_gradients_match_finite_differences(name):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, generator=g, dtype=torch.float64).log_softmax(-1)
    assert torch.autograd.gradcheck(lambda x: DIVERGENCES[name](x.log_softmax(-1), t), (s,))


@pytest.mark.parametrize("fn, kw", [(jsd, {"beta": 1.5}), (jsd, {"beta": -0.1}), (skew_forward_kl, {"lam": 1.0}),
                                    (skew_reverse_kl, {"lam": -0.5})])
def test_divergence_knobs_out_of_range_are_rejected(fn, kw):
    x = random_logp(0)
    with pytest.raises(ValueError, match=next(iter(kw))):
        fn(x, x, **kw)


# ---------------------------------------------------------------------------------------------
# kd_loss_sum
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_kd_loss_is_the_sum_of_the_per_token_divergence_over_answer_tokens(name):
    student, teacher, targets = batch()
    keep = targets != IGNORE_INDEX
    expected = DIVERGENCES[name](student[keep].log_softmax(-1), teacher[keep].log_softmax(-1)).sum()
    assert torch.allclose(kd_loss_sum(student, teacher, targets, divergence=name), expected, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_are_finite_with_masked_targets_and_minus_inf_logits(name):
    student, teacher, targets = batch(vs=8, vt=8)
    with torch.no_grad():
        student[..., 6] = teacher[..., 6] = -math.inf  # a vocabulary row masked out in both
        teacher[..., 7] = -math.inf  # a row only the teacher masks
        student[0, 2, 5] = -math.inf  # a row only the student masks, at one answer position
        student[1, 0, 0], student[1, 0, 1] = 300.0, -300.0  # probabilities that underflow
    loss, grad = value_and_grad(student, teacher, targets, divergence=name)
    assert torch.isfinite(loss) and loss >= 0
    assert torch.isfinite(grad).all()
    assert (grad[..., 6] == 0).all()  # nothing flows into a row that is -inf in the student


def test_student_mass_on_a_row_the_teacher_forbids_is_pushed_down_by_reverse_kl():
    student, teacher, targets = batch(vs=6, vt=6)
    teacher[..., 5] = -math.inf
    _, grad = value_and_grad(student, teacher, targets, divergence="reverse_kl")
    keep = targets != IGNORE_INDEX
    assert (grad[keep][:, 5] > 0).all()  # gradient descent lowers that logit


@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_unchunked_in_value_and_gradient(name, monkeypatch):
    monkeypatch.setattr(chunks, "RECOMPUTE_ABOVE", 0)  # chunked (and recomputed) however small the batch
    student, teacher, targets = batch()
    small = value_and_grad(student, teacher, targets, divergence=name, chunk_size=3)
    whole = value_and_grad(student, teacher, targets, divergence=name, chunk_size=10_000)
    assert torch.allclose(small[0], whole[0], atol=1e-5)
    assert torch.allclose(small[1], whole[1], atol=1e-6)
    with torch.no_grad():  # the path without checkpointing gives the same value
        assert torch.allclose(kd_loss_sum(student, teacher, targets, divergence=name, chunk_size=3), whole[0], atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_fp32_chunk_temporaries_are_not_kept_for_backward(name, monkeypatch):
    """Above chunks.RECOMPUTE_ABOVE elements (here: always), only the selected answer rows (in their
    own dtype) are kept for backward; every fp32 [chunk, V] temporary is recomputed, which is what
    bounds memory for a 152k-row vocabulary."""
    monkeypatch.setattr(chunks, "RECOMPUTE_ABOVE", 0)
    student, teacher, targets = batch(b=4, t=16, vs=64, vt=64)
    student = student.detach().bfloat16().requires_grad_()
    saved = {}

    def pack(x):
        saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        kd_loss_sum(student, teacher.bfloat16(), targets, divergence=name, chunk_size=8)
    answer_rows_bytes = 2 * int((targets != IGNORE_INDEX).sum()) * 64 * 2  # student + teacher rows, bf16
    mask_bytes = targets.numel()  # the boolean answer mask, kept by the row selection
    assert sum(saved.values()) <= answer_rows_bytes + mask_bytes


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_forward_kl_has_a_written_out_gradient_equal_to_autograd_s_of_the_formula(temperature):
    """kd_loss_sum computes forward KL with its closed-form gradient (dense._ForwardKL, no autograd
    graph over [N, V]); value and gradient are those of autograd through the generic formula, also
    with masked rows and underflowing probabilities, and its gradient passes gradcheck in fp64."""
    student, teacher, targets = batch(b=3, t=7, vs=13, vt=13)
    with torch.no_grad():
        student[..., 6] = teacher[..., 6] = -math.inf
        teacher[..., 7] = -math.inf
        student[1, 0, 0], student[1, 0, 1] = 300.0, -300.0  # below LOG_PROB_FLOOR: no gradient there
    keep = targets != IGNORE_INDEX
    s = student.detach()[keep].clone().requires_grad_()
    expected = forward_kl((s / temperature).log_softmax(-1), (teacher[keep] / temperature).log_softmax(-1)).sum()
    (expected * temperature ** 2).backward()
    value, grad = value_and_grad(student, teacher, targets, divergence="forward_kl", temperature=temperature, chunk_size=4)
    assert torch.allclose(value, expected.detach() * temperature ** 2, rtol=1e-6)
    assert torch.allclose(grad[keep], s.grad, atol=1e-7) and (grad[~keep] == 0).all()

    g = torch.Generator().manual_seed(1)
    s64 = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t64 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: dense._ForwardKL.apply(x, t64, temperature, 4), (s64,))


def test_teacher_extra_vocab_rows_are_ignored():
    student, teacher, targets = batch(vs=11, vt=14)
    cut = value_and_grad(student, teacher[..., :11], targets, divergence="forward_kl")
    padded = value_and_grad(student, teacher, targets, divergence="forward_kl")
    assert torch.allclose(padded[0], cut[0]) and torch.allclose(padded[1], cut[1])
    # and the other way round: a student with more rows than the teacher
    wide_student = torch.cat([student.detach(), torch.randn(2, 5, 3)], dim=-1).requires_grad_()
    assert torch.allclose(kd_loss_sum(wide_student, teacher[..., :11], targets, divergence="forward_kl"), cut[0])


def test_vocab_size_cuts_both_to_the_tokenizer_rows():
    student, teacher, targets = batch(vs=11, vt=14)
    targets = targets.clamp(max=7)
    expected = kd_loss_sum(student[..., :8], teacher[..., :8], targets, divergence="jsd")
    assert torch.allclose(kd_loss_sum(student, teacher, targets, divergence="jsd", vocab_size=8), expected)
    with pytest.raises(ValueError, match="vocab_size 12 exceeds"):
        kd_loss_sum(student, teacher, targets, divergence="jsd", vocab_size=12)


@pytest.mark.parametrize("name", NAMES)
def test_temperature_softens_both_and_scales_by_t_squared(name):
    student, teacher, targets = batch()
    at_two = kd_loss_sum(student, teacher, targets, divergence=name, temperature=2.0)
    at_one = kd_loss_sum(student / 2, teacher / 2, targets, divergence=name, temperature=1.0)
    assert torch.allclose(at_two, 4 * at_one, atol=1e-5)


def test_masked_positions_contribute_nothing():
    student, teacher, targets = batch()
    masked = targets == IGNORE_INDEX
    before = value_and_grad(student, teacher, targets, divergence="jsd")
    with torch.no_grad():
        student[masked] = torch.randn(int(masked.sum()), 11) * 50
    teacher = teacher.clone()
    teacher[masked] = math.nan  # not even NaN at a masked position leaks in
    after = value_and_grad(student, teacher, targets, divergence="jsd")
    assert torch.allclose(before[0], after[0])
    assert torch.allclose(before[1], after[1])
    assert (after[1][masked] == 0).all()


def test_no_answer_tokens_give_a_zero_that_still_backpropagates():
    student, teacher, targets = batch()
    loss = kd_loss_sum(student, teacher, torch.full_like(targets, IGNORE_INDEX), divergence="forward_kl")
    loss.backward()
    assert loss.item() == 0.0 and (student.grad == 0).all()


def test_result_is_differentiable_wrt_the_student_only_and_teacher_needing_grad_is_rejected():
    student, teacher, targets = batch()
    assert kd_loss_sum(student, teacher, targets, divergence="tvd").requires_grad
    with pytest.raises(ValueError, match="no_grad"):
        kd_loss_sum(student, teacher.requires_grad_(), targets, divergence="tvd")


def test_bf16_inputs_give_a_finite_fp32_result_close_to_fp32():
    student, teacher, targets = batch()
    for name in NAMES:
        low = kd_loss_sum(student.detach().bfloat16(), teacher.bfloat16(), targets, divergence=name, chunk_size=4)
        ref = kd_loss_sum(student.detach().bfloat16().float(), teacher.bfloat16().float(), targets, divergence=name)
        assert low.dtype == torch.float32 and torch.isfinite(low)
        assert low.item() == pytest.approx(ref.item(), rel=1e-5)  # the bf16 inputs are computed on in fp32
        exact = kd_loss_sum(student.detach(), teacher, targets, divergence=name)
        assert low.item() == pytest.approx(exact.item(), rel=0.05)  # and bf16 rounding moves it only a little


def test_unknown_divergence_lists_the_allowed_names():
    student, teacher, targets = batch()
    with pytest.raises(ValueError, match="unknown divergence 'kl'.*forward_kl, reverse_kl, jsd, skew_forward_kl"):
        kd_loss_sum(student, teacher, targets, divergence="kl")


def test_bad_settings_are_reported_together():
    student, teacher, targets = batch()
    with pytest.raises(ValueError) as err:
        kd_loss_sum(student, teacher, targets, divergence="jsd", temperature=0.0, beta=2.0, lam=1.0, chunk_size=0)
    for field in ("temperature", "beta", "lam", "chunk_size"):
        assert field in str(err.value)


# ---------------------------------------------------------------------------------------------
# distill_loss
# ---------------------------------------------------------------------------------------------

def test_distill_alpha_one_is_ce_alpha_zero_is_kd_and_between_the_mix():
    student, teacher, targets = batch()
    ce = cross_entropy_sum(student, targets)
    kd = kd_loss_sum(student, teacher, targets, divergence="skew_reverse_kl", temperature=2.0, lam=0.2)
    kw = dict(loss="skew_reverse_kl", temperature=2.0, lam=0.2)
    assert torch.allclose(distill_loss(student, teacher, targets, alpha=1.0, **kw).total, ce)
    assert torch.allclose(distill_loss(student, None, targets, alpha=1.0, **kw).total, ce)  # KD skipped: no teacher needed
    assert torch.allclose(distill_loss(student, teacher, targets, alpha=0.0, **kw).total, kd)
    assert torch.allclose(distill_loss(student, teacher, targets, alpha=0.3, **kw).total, 0.3 * ce + 0.7 * kd)


def test_the_terms_are_the_unweighted_ce_and_kd_where_they_were_computed():
    student, teacher, targets = batch()
    ce = cross_entropy_sum(student, targets)
    kd = kd_loss_sum(student, teacher, targets, divergence="jsd", beta=0.3)
    mixed = distill_loss(student, teacher, targets, loss="jsd", alpha=0.3, beta=0.3)
    assert torch.equal(mixed.ce, ce) and torch.equal(mixed.kd, kd)
    assert torch.equal(mixed.total, 0.3 * ce + 0.7 * kd)  # the same operations: bit for bit
    only_kd = distill_loss(student, teacher, targets, loss="jsd", alpha=0.0, beta=0.3)
    assert only_kd.ce is None and torch.equal(only_kd.kd, kd)
    only_ce = distill_loss(student, None, targets, loss="jsd", alpha=1.0)
    assert only_ce.kd is None and torch.equal(only_ce.ce, ce)


def test_sft_ignores_the_teacher():
    student, teacher, targets = batch()
    ce = cross_entropy_sum(student, targets)
    assert torch.allclose(distill_loss(student, None, targets, loss="sft", alpha=0.0).total, ce)
    assert torch.allclose(distill_loss(student, torch.full_like(teacher, math.nan), targets, loss="sft", alpha=0.5).total, ce)


def test_the_configs_allowed_losses_are_the_losses_module_s():
    from clpd.config.enums import DistillLoss

    assert [loss.value for loss in DistillLoss] == list(LOSS_NAMES) == ["sft", *DIVERGENCES]


def test_distill_rejects_unknown_losses_bad_alpha_and_a_missing_teacher():
    student, teacher, targets = batch()
    assert LOSS_NAMES == ("sft", *DIVERGENCES)
    with pytest.raises(ValueError, match="unknown loss 'kd'.*sft, forward_kl"):
        distill_loss(student, teacher, targets, loss="kd", alpha=0.5)
    with pytest.raises(ValueError, match="alpha must be in"):
        distill_loss(student, teacher, targets, loss="jsd", alpha=1.5)
    with pytest.raises(ValueError, match="needs teacher_logits"):
        distill_loss(student, None, targets, loss="jsd", alpha=0.5)


def test_logits_of_answer_positions_only_are_read_in_place_not_copied():
    logits = torch.randn(5, 7)  # what the loop hands in: [answer positions, V]
    assert answer_rows(logits, torch.ones(5, dtype=torch.bool)).data_ptr() == logits.data_ptr()
    mixed = torch.tensor([True, False, True, True, False])
    assert torch.equal(answer_rows(logits, mixed), logits[mixed])


@pytest.mark.parametrize("name", NAMES)
def test_small_losses_keep_their_chunks_for_backward_with_the_same_value_and_gradient(name, monkeypatch):
    student, teacher, targets = batch(b=4, t=16, vs=64, vt=64)
    results = []
    for threshold in (0, chunks.RECOMPUTE_ABOVE):  # recomputed chunks of 8, then one kept chunk (4 x 16 x 64 is small)
        monkeypatch.setattr(chunks, "RECOMPUTE_ABOVE", threshold)
        s = student.detach().clone().requires_grad_()
        value = kd_loss_sum(s, teacher, targets, divergence=name, chunk_size=8)
        value.backward()
        results.append((value.detach(), s.grad))
    # (one chunk against chunks of 8: the same sums in another order)
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-6) and torch.allclose(results[0][1], results[1][1], atol=1e-7)
