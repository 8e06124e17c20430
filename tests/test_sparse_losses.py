"""Sparse (top-k) teachers: sparse_kd_loss_sum is the dense loss when k == width, the exact
divergence between (k+1)-bucket coarsenings at T = 1 otherwise, and distill_loss takes a TopK
wherever it takes dense teacher logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clpd.losses import chunks
from clpd.losses.divergences import DIVERGENCES
from clpd.data.records import IGNORE_INDEX
from clpd.losses.sparse import TopK, sparse_kd_loss_sum, tempered_tail_lse, top_k_outputs
from clpd.losses.distill import distill_loss
from clpd.losses.dense import kd_loss_sum

NAMES = list(DIVERGENCES)
TOL = dict(rtol=1e-6, atol=1e-6)


def batch(seed: int = 0, b: int = 2, t: int = 5, v: int = 11, dtype=torch.float32):
    """Student logits (leaf, requires grad), teacher logits and targets with masked prompt/padding."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, t, v, generator=g, dtype=dtype) * 2).requires_grad_()
    teacher = torch.randn(b, t, v, generator=g, dtype=dtype) * 2
    targets = torch.randint(0, v, (b, t), generator=g)
    targets[0, :2] = IGNORE_INDEX  # prompt
    targets[-1, -1] = IGNORE_INDEX  # padding
    targets[torch.rand(b, t, generator=g) < 0.2] = IGNORE_INDEX  # and a few more, anywhere
    return student, teacher, targets


def stored(teacher: torch.Tensor, targets: torch.Tensor, k: int, width: int) -> TopK:
    """What the store builder keeps: the top k of the teacher's answer rows."""
    return top_k_outputs(teacher[targets != IGNORE_INDEX], k, width)


def value_and_grad(loss_fn, student, *args, **kw):
    student.grad = None
    loss = loss_fn(student, *args, **kw)
    loss.backward()
    return loss.detach(), student.grad.clone()


def coarsened_logp(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log of softmax(logits) summed into buckets: each of the k rows in ``indices``, then one bucket for
    all the other rows; built from the probabilities directly, in fp64."""
    p = logits.double().softmax(-1)
    top = p.gather(-1, indices)
    rest = p.scatter(-1, indices, 0.0).sum(-1, keepdim=True)
    return torch.cat([top, rest], dim=-1).log()


# ---------------------------------------------------------------------------------------------
# top_k_outputs
# ---------------------------------------------------------------------------------------------

def test_top_k_outputs_keeps_the_largest_logits_and_the_logsumexp_of_the_rest():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 13, generator=g) * 3
    for k, width in [(1, 13), (4, 13), (13, 13), (3, 9), (9, 9)]:
        top = top_k_outputs(logits, k, width)
        assert top.indices.shape == top.values.shape == (6, k) and top.tail_lse.shape == (6,)
        assert top.values.dtype == top.tail_lse.dtype == torch.float32
        assert torch.equal(top.values, logits.gather(-1, top.indices))
        assert (top.indices < width).all()
        assert (top.values.min(-1).values >= logits[:, :width].scatter(-1, top.indices, -math.inf).max(-1).values).all()
        # round trip: the k values and the tail hold all of the first width rows' mass
        whole = torch.cat([top.values, top.tail_lse[:, None]], dim=-1).logsumexp(-1)
        torch.testing.assert_close(whole, logits[:, :width].logsumexp(-1), **TOL)
        if k == width:
            assert (top.tail_lse == -math.inf).all()


def test_top_k_outputs_refuses_k_outside_one_to_width():
    logits = torch.randn(3, 8)
    for k in (0, 6):
        with pytest.raises(ValueError, match=r"k must be in \[1, width=5\], got " + str(k)):
            top_k_outputs(logits, k, 5)
    with pytest.raises(ValueError, match="width must be in"):
        top_k_outputs(logits, 2, 9)


def test_tempered_tail_is_exact_at_t_one_and_for_a_flat_tail_and_bounds_the_true_one_otherwise():
    g = torch.Generator().manual_seed(0)
    tail = torch.randn(5, 20, generator=g, dtype=torch.float64) * 2  # five uneven tails of 20 rows
    lse = tail.logsumexp(-1)
    assert torch.equal(tempered_tail_lse(lse, 20, 1.0), lse)
    flat = torch.full((1, 20), 0.7, dtype=torch.float64)
    for temperature in (0.5, 2.0):
        torch.testing.assert_close(tempered_tail_lse(flat.logsumexp(-1), 20, temperature),
                                   (flat / temperature).logsumexp(-1), rtol=1e-12, atol=1e-12)
    true_hot = (tail / 2.0).logsumexp(-1)
    true_cold = (tail / 0.5).logsumexp(-1)
    assert (tempered_tail_lse(lse, 20, 2.0) > true_hot).all()  # T > 1: an upper bound
    assert (tempered_tail_lse(lse, 20, 0.5) < true_cold).all()  # T < 1: a lower bound


# ---------------------------------------------------------------------------------------------
# k == width: exactly the dense loss
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_with_k_equal_to_width_value_and_gradient_equal_the_dense_loss(name):
    for seed, (b, t, v) in enumerate([(2, 5, 7), (3, 4, 33), (1, 9, 33)]):
        student, teacher, targets = batch(seed, b, t, v)
        for vocab_size in (None, v - 2):
            width = v if vocab_size is None else vocab_size
            top = stored(teacher, targets, width, width)
            for temperature in (1.0, 0.5, 2.0):
                kw = dict(divergence=name, temperature=temperature, vocab_size=vocab_size, beta=0.3, lam=0.2)
                dense = value_and_grad(kd_loss_sum, student, teacher, targets, **kw)
                sparse = value_and_grad(sparse_kd_loss_sum, student, top, targets, **kw)
                torch.testing.assert_close(sparse[0], dense[0], **TOL)
                torch.testing.assert_close(sparse[1], dense[1], **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_with_k_equal_to_width_minus_inf_logits_give_the_dense_finite_gradient(name):
    student, teacher, targets = batch(v=8)
    with torch.no_grad():
        student[..., 6] = teacher[..., 6] = -math.inf  # a row masked in both
        teacher[..., 7] = -math.inf  # a row only the teacher masks
    top = stored(teacher, targets, 8, 8)
    dense = value_and_grad(kd_loss_sum, student, teacher, targets, divergence=name)
    sparse = value_and_grad(sparse_kd_loss_sum, student, top, targets, divergence=name)
    assert torch.isfinite(sparse[0]) and torch.isfinite(sparse[1]).all()
    torch.testing.assert_close(sparse[0], dense[0], **TOL)
    torch.testing.assert_close(sparse[1], dense[1], **TOL)


# ---------------------------------------------------------------------------------------------
# k < width: the divergence between coarsenings
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_at_t_one_the_sparse_loss_is_the_divergence_between_the_coarsened_distributions(name):
    for seed, v in [(0, 7), (1, 33)]:
        student, teacher, targets = batch(seed, v=v)
        answer = targets != IGNORE_INDEX
        for k, vocab_size in [(1, None), (3, None), (5, v - 1)]:
            width = v if vocab_size is None else vocab_size
            top = stored(teacher, targets, k, width)
            knobs = dict(beta=0.3, lam=0.2)
            by_hand = DIVERGENCES[name](coarsened_logp(student[answer][:, :width], top.indices),
                                        coarsened_logp(teacher[answer][:, :width], top.indices), **knobs).sum()
            sparse = sparse_kd_loss_sum(student, top, targets, divergence=name, vocab_size=vocab_size, **knobs)
            torch.testing.assert_close(sparse.double(), by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_at_t_one_coarsening_never_increases_the_divergence(name):
    """Data-processing inequality: every divergence here is an f-divergence (the skew KLs too: KL is
    jointly convex and the mixture is linear), so merging rows can only lower it, row by row."""
    for seed, v in [(0, 7), (1, 33), (2, 33)]:
        student, teacher, targets = batch(seed, v=v)
        answer = targets != IGNORE_INDEX
        for k in (1, 2, v // 2, v - 1):
            top = stored(teacher, targets, k, v)
            s = student[answer].detach().log_softmax(-1)
            t = teacher[answer].log_softmax(-1)
            dense_rows = DIVERGENCES[name](s, t, beta=0.3, lam=0.2)
            sparse_rows = DIVERGENCES[name](coarsened_logp(s, top.indices).float(),
                                            coarsened_logp(t, top.indices).float(), beta=0.3, lam=0.2)
            assert (sparse_rows <= dense_rows + 1e-6).all()
            sparse = sparse_kd_loss_sum(student, top, targets, divergence=name, beta=0.3, lam=0.2)
            dense = kd_loss_sum(student, teacher, targets, divergence=name, beta=0.3, lam=0.2)
            assert sparse <= dense + 1e-6
            if k < v - 1:
                assert sparse < dense  # strictly: the random tails are far from proportional
            else:  # a one-row tail bucket merges nothing: the coarsening is the distribution itself
                torch.testing.assert_close(sparse, dense, **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_at_other_temperatures_a_flat_teacher_tail_is_coarsened_exactly(name):
    """Where the teacher's tail rows share one logit the flat-tail tempering is exact, so the sparse
    loss is the divergence between the coarsened tempered distributions, times T ** 2."""
    v, k = 9, 3
    student, teacher, targets = batch(v=v)
    answer = targets != IGNORE_INDEX
    with torch.no_grad():
        teacher[..., k:] = teacher[..., :k].amin(-1, keepdim=True) - 1.0  # one logit, below the first k rows
    top = stored(teacher, targets, k, v)
    assert (top.indices.sort(-1).values == torch.arange(k)).all()
    for temperature in (0.5, 2.0):
        by_hand = DIVERGENCES[name](coarsened_logp(student[answer] / temperature, top.indices),
                                    coarsened_logp(teacher[answer] / temperature, top.indices)).sum()
        sparse = sparse_kd_loss_sum(student, top, targets, divergence=name, temperature=temperature)
        torch.testing.assert_close(sparse.double(), temperature ** 2 * by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_are_finite_when_the_student_puts_no_mass_in_the_tail(name):
    student, teacher, targets = batch(v=6)
    top = stored(teacher, targets, 2, 6)
    answer = targets != IGNORE_INDEX
    with torch.no_grad():  # the student gives -inf to every row outside the teacher's top 2
        rows = student[answer]
        rows.fill_(-math.inf).scatter_(-1, top.indices, 0.5)
        student[answer] = rows
    loss, grad = value_and_grad(sparse_kd_loss_sum, student, top, targets, divergence=name)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_the_forward_kl_gradient_is_p_s_minus_p_t_on_the_top_k_and_proportional_in_the_tail():
    """Forward KL between coarsenings at T = 1: on the teacher's k rows the gradient is p_s - p_t, as
    for the dense loss; below them the student is only asked for the right total, so each tail row
    gets p_s * (1 - P_t(tail) / P_s(tail)): its own probability times one factor shared by the tail."""
    student, teacher, targets = batch(v=10)
    top = stored(teacher, targets, 3, 10)
    _, grad = value_and_grad(sparse_kd_loss_sum, student, top, targets, divergence="forward_kl")
    answer = targets != IGNORE_INDEX
    p_s, p_t = student[answer].detach().softmax(-1), teacher[answer].softmax(-1)
    in_tail = torch.ones_like(p_s, dtype=torch.bool).scatter(-1, top.indices, False)
    tail_s, tail_t = (p_s * in_tail).sum(-1, keepdim=True), (p_t * in_tail).sum(-1, keepdim=True)
    expected = torch.where(in_tail, p_s * (1 - tail_t / tail_s), p_s - p_t)
    torch.testing.assert_close(grad[answer], expected, **TOL)
    assert (grad[~answer] == 0).all()


# ---------------------------------------------------------------------------------------------
# Mechanics: chunking, masking, memory, bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_chunk_size_one_and_1024_give_the_same_value_and_gradient(name, monkeypatch):
    monkeypatch.setattr(chunks, "RECOMPUTE_ABOVE", 0)  # chunked (and recomputed) however small the batch
    student, teacher, targets = batch(v=33)
    for k in (4, 33):
        top = stored(teacher, targets, k, 33)
        kw = dict(divergence=name, temperature=2.0)
        one = value_and_grad(sparse_kd_loss_sum, student, top, targets, chunk_size=1, **kw)
        whole = value_and_grad(sparse_kd_loss_sum, student, top, targets, chunk_size=1024, **kw)
        torch.testing.assert_close(one[0], whole[0], **TOL)
        torch.testing.assert_close(one[1], whole[1], **TOL)
        with torch.no_grad():  # the path without checkpointing gives the same value
            torch.testing.assert_close(sparse_kd_loss_sum(student, top, targets, chunk_size=1, **kw), whole[0], **TOL)


def test_fp32_chunk_temporaries_are_not_kept_for_backward(monkeypatch):
    """As for kd_loss_sum, above chunks.RECOMPUTE_ABOVE elements (here: always): only the student's
    answer rows (in their own dtype), the mask and the stored teacher rows are kept for backward;
    every fp32 [chunk, width] temporary is recomputed."""
    monkeypatch.setattr(chunks, "RECOMPUTE_ABOVE", 0)
    student, teacher, targets = batch(b=4, t=16, v=64)
    student = student.detach().bfloat16().requires_grad_()
    top = stored(teacher, targets, 8, 64)
    saved = {}

    def pack(x):
        saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        sparse_kd_loss_sum(student, top, targets, divergence="jsd", chunk_size=8)
    n = int((targets != IGNORE_INDEX).sum())
    kept = n * 64 * 2 + targets.numel() + n * 8 * (8 + 4) + n * 4  # rows (bf16), mask, indices + values, tail
    assert sum(saved.values()) <= kept


def test_answer_rows_selected_beforehand_give_the_same_loss_and_gradient():
    student, teacher, targets = batch(v=9)
    answer = targets != IGNORE_INDEX
    top = stored(teacher, targets, 4, 9)
    batched = value_and_grad(sparse_kd_loss_sum, student, top, targets, divergence="jsd", temperature=2.0)
    rows = student.detach()[answer].requires_grad_()
    selected = value_and_grad(sparse_kd_loss_sum, rows, top, targets[answer], divergence="jsd", temperature=2.0)
    torch.testing.assert_close(selected[0], batched[0], rtol=0, atol=0)
    torch.testing.assert_close(selected[1], batched[1][answer], rtol=0, atol=0)


def test_masked_positions_and_no_answer_tokens_contribute_nothing():
    student, teacher, targets = batch()
    top = stored(teacher, targets, 3, 11)
    masked = targets == IGNORE_INDEX
    before = value_and_grad(sparse_kd_loss_sum, student, top, targets, divergence="jsd")
    with torch.no_grad():
        student[masked] = torch.randn(int(masked.sum()), 11) * 50
    after = value_and_grad(sparse_kd_loss_sum, student, top, targets, divergence="jsd")
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert (after[1][masked] == 0).all()
    none = torch.full_like(targets, IGNORE_INDEX)
    empty = top_k_outputs(torch.zeros(0, 11), 3, 11)
    loss, grad = value_and_grad(sparse_kd_loss_sum, student, empty, none, divergence="jsd")
    assert loss.item() == 0.0 and (grad == 0).all()


def test_bad_teacher_rows_are_rejected_with_a_message_naming_the_problem():
    student, teacher, targets = batch()
    n = int((targets != IGNORE_INDEX).sum())
    top = stored(teacher, targets, 3, 11)
    with pytest.raises(ValueError, match=f"teacher TopK has {n - 1} rows but targets have {n} answer positions"):
        sparse_kd_loss_sum(student, TopK(*(x[1:] for x in top)), targets, divergence="jsd")
    wide = stored(teacher, targets, 9, 11)
    with pytest.raises(ValueError, match=r"k = 9 must be in \[1, width = 8\]"):
        sparse_kd_loss_sum(student, wide, targets, divergence="jsd", vocab_size=8)
    with pytest.raises(ValueError, match=r"indices must be in \[0, width = 8\), got \[\d+, 10\]"):
        sparse_kd_loss_sum(student, top, targets, divergence="jsd", vocab_size=8)
    with pytest.raises(ValueError, match="shapes do not line up"):
        sparse_kd_loss_sum(student, TopK(top.indices, top.values[:, :2], top.tail_lse), targets, divergence="jsd")
    with pytest.raises(ValueError, match="no_grad"):
        sparse_kd_loss_sum(student, top._replace(values=top.values.requires_grad_()), targets, divergence="jsd")
    with pytest.raises(ValueError) as err:  # the dense function's checks, all reported together
        sparse_kd_loss_sum(student, top, targets, divergence="kl", temperature=0.0, chunk_size=0, vocab_size=12)
    for field in ("unknown divergence 'kl'", "temperature", "chunk_size", "vocab_size 12 exceeds"):
        assert field in str(err.value)


# ---------------------------------------------------------------------------------------------
# distill_loss
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_distill_loss_with_a_full_top_k_teacher_equals_the_dense_one(name):
    student, teacher, targets = batch(v=9)
    top = stored(teacher, targets, 9, 9)
    kw = dict(loss=name, alpha=0.5, temperature=2.0)
    dense = distill_loss(student, teacher, targets, **kw)
    sparse = distill_loss(student, top, targets, **kw)
    assert torch.equal(sparse.ce, dense.ce)  # CE is the student's alone
    torch.testing.assert_close(sparse.kd, dense.kd, **TOL)
    torch.testing.assert_close(sparse.total, dense.total, **TOL)
    torch.testing.assert_close(sparse.total, 0.5 * sparse.ce + 0.5 * sparse.kd, rtol=0, atol=0)


def test_distill_loss_routes_a_top_k_teacher_to_the_sparse_loss_and_keeps_ce_on_the_full_vocabulary():
    student, teacher, targets = batch(v=11)
    top = stored(teacher, targets, 4, 8)
    terms = distill_loss(student, top, targets, loss="reverse_kl", alpha=0.25, vocab_size=8)
    assert torch.equal(terms.kd, sparse_kd_loss_sum(student, top, targets, divergence="reverse_kl", vocab_size=8))
    answer = targets != IGNORE_INDEX
    assert torch.equal(terms.ce, F.cross_entropy(student[answer], targets[answer], reduction="sum"))
    assert terms.kd < kd_loss_sum(student, teacher, targets, divergence="reverse_kl", vocab_size=8)
