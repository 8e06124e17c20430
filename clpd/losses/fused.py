"""The output layer and the loss fused: ``fused_distill_loss`` takes the answer rows' last hidden
states and the output matrix (:class:`HeadRows`) instead of their logits, and never holds a
``[answer rows, V]`` matrix of logits or of their gradient.

Rows go through the output matrix ``chunk_size`` at a time. For each chunk, the logits are made,
the loss terms are taken on them, and the gradient of the chunk's loss w.r.t. its logits is turned
at once into the gradients w.r.t. the chunk's hidden states (``g @ W``) and w.r.t. the output matrix
(``g.T @ h``, accumulated); then the chunk's logits are dropped. Backward only scales the two
stored gradients (the approach of Liger-Kernel's fused linear cross-entropy and KL divergence).
A live teacher's rows can come as :class:`HeadRows` too: its chunk of logits is made beside the
student's and dropped with it.

Per chunk, the gradient w.r.t. the logits is written out for cross-entropy (``softmax - onehot``)
and for forward KL (dense: :func:`clpd.losses.dense.forward_kl_chunk_with_grad`; against a stored
:class:`~clpd.losses.sparse.TopK`: :func:`clpd.losses.sparse.sparse_forward_kl_chunk`); every other
divergence takes autograd's gradient of the chunk's loss, computed with the same per-chunk functions as the unfused losses. So each
fused loss is the unfused one summed in another order: same value and gradients to float rounding
(tests/test_fused.py).

Matmuls run in the ambient autocast dtype (bf16 on CUDA), as the model's own output layer would;
the loss itself is fp32, as elsewhere.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from clpd.losses.chunks import RECOMPUTE_ABOVE, _raise_if
from clpd.losses.dense import _chunk_sum, forward_kl_chunk, forward_kl_chunk_with_grad
from clpd.losses.divergences import DIVERGENCES
from clpd.losses.sparse import TopK, _sparse_chunk_sum, sparse_forward_kl_chunk
from clpd.losses.vocab_slices import sliced_rows


class HeadRows(NamedTuple):
    """A model's outputs at answer rows before its output layer: ``hidden`` [N, H] (after the final
    norm) and the output matrix ``weight`` [V, H]; the logits would be ``hidden @ weight.T``."""
    hidden: torch.Tensor
    weight: torch.Tensor


Teacher = Union[torch.Tensor, TopK, HeadRows]


def fused_loss_terms(student: HeadRows, teacher: Optional[Teacher], targets: torch.Tensor, *, loss: str,
                     alpha: float, temperature: float = 1.0, beta: float = 0.5, lam: float = 0.1,
                     chunk_size: int = 256, vocab_size: Optional[int] = None, gold: bool = True,
                     slice_size: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The terms of :func:`clpd.losses.distill.distill_loss` (which calls this for
    :class:`HeadRows`), as (total, ce, kd): ``targets`` [N] are the answer rows' gold or sampled
    tokens, ``teacher`` dense answer-row logits, a TopK or the teacher's HeadRows (None without a
    KD term). ``total`` has gradients for ``student.hidden`` and ``student.weight`` where they
    require them and grad is enabled; ``ce`` and ``kd`` are values only. ``slice_size``: each row
    chunk is made that many vocabulary rows at a time (:mod:`clpd.losses.vocab_slices`; not against
    a stored top-k teacher), None for whole rows. The loss's settings are
    checked by ``distill_loss``, its one caller; the shapes, which only rows have, here."""
    if student.hidden.dim() != 2 or targets.shape != student.hidden.shape[:1]:
        _raise_if([f"shapes do not line up: hidden {tuple(student.hidden.shape)}, targets {tuple(targets.shape)} "
                   "(expected [N, H] answer rows and [N] targets)"])
    ce_on = loss == "sft" or (alpha > 0.0 and gold)
    kd_on = loss != "sft" and alpha < 1.0
    weights = (1.0, 0.0) if loss == "sft" else (alpha if gold else 0.0, 1.0 - alpha)
    n, width = student.hidden.size(0), student.weight.size(0)
    rows = chunk_size if n * width > RECOMPUTE_ABOVE else max(n, 1)  # small losses: one chunk
    knobs = dict(targets=targets, teacher=teacher if kd_on else None, ce_on=ce_on, weights=weights,
                 divergence=loss, temperature=temperature, beta=beta, lam=lam, vocab_size=vocab_size)
    if slice_size is not None and slice_size < width and not isinstance(teacher, TopK):
        terms = partial(_sliced_rows, slice_size=slice_size, **knobs)
    else:  # a stored top-k teacher's side is k wide already: only the rows are chunked
        terms = partial(_whole_rows, **knobs)
    sums: Dict[str, torch.Tensor] = {}
    total = _FusedOutputLoss.apply(student.hidden, student.weight, terms, rows, sums, torch.is_grad_enabled())
    return total, sums.get("ce"), sums.get("kd")


class _FusedOutputLoss(torch.autograd.Function):
    """``terms`` summed over row chunks of ``hidden @ weight.T``; the gradients are made in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, terms, rows: int, sums: dict,
                tracked: bool) -> torch.Tensor:
        want_h, want_w = tracked and ctx.needs_input_grad[0], tracked and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = None  # the first chunk's product, then the others added to it (no zero-filled [V, H] first)
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        for start in range(0, hidden.size(0), rows):
            h = hidden[start:start + rows]
            value, parts, chunk_h, grad_w = terms(h, weight, start, start + h.size(0), want_h=want_h, want_w=want_w,
                                                  grad_w=grad_w)
            total += value
            for name, part in parts.items():
                sums[name] = sums.get(name, 0.0) + part
            if chunk_h is not None:
                grad_h[start:start + h.size(0)] = chunk_h
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, d_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors  # used once: scaled in place, no second [V, H] copy
        return (None if grad_h is None else grad_h.mul_(d_total.to(grad_h.dtype)),
                None if grad_w is None else grad_w.mul_(d_total.to(grad_w.dtype)), None, None, None, None)


def _whole_rows(h: torch.Tensor, weight: torch.Tensor, start: int, end: int, *, want_h: bool, want_w: bool,
                grad_w: Optional[torch.Tensor], **knobs):
    """One row chunk over the whole vocabulary: its [rows, V] logits, terms and logit gradient,
    turned into (total, parts, gradient w.r.t. ``h``, ``grad_w`` with this chunk's part added)."""
    logits = h @ weight.T  # in the autocast dtype where one is active
    value, parts, grad = _chunk_terms(logits, start, end, want_grad=want_h or want_w, **knobs)
    del logits
    chunk_h = None
    if grad is not None:
        if not torch.is_autocast_enabled(h.device.type):  # (autocast casts the matmuls itself)
            grad = grad.to(h.dtype)
        if want_h:
            chunk_h = grad @ weight
        if want_w:
            part = (grad.T @ h).to(weight.dtype)
            grad_w = part if grad_w is None else grad_w.add_(part)
    return value, parts, chunk_h, grad_w


def _sliced_rows(h: torch.Tensor, weight: torch.Tensor, start: int, end: int, *, targets: torch.Tensor,
                 teacher: Optional[Teacher], vocab_size: Optional[int], slice_size: int, **knobs):
    """One row chunk by vocabulary slices (:mod:`clpd.losses.vocab_slices`)."""
    rows = None if teacher is None else _teacher_input(teacher, start, end)
    width = vocab_size or (weight.size(0) if rows is None or isinstance(rows, HeadRows)
                           else min(weight.size(0), rows.size(1)))
    if isinstance(rows, HeadRows):
        width = min(width, rows.weight.size(0))
    return sliced_rows(h, weight, targets[start:end], rows, width=width, size=slice_size, **knobs)


def _teacher_input(teacher: Teacher, start: int, end: int) -> Union[torch.Tensor, HeadRows]:
    """The teacher's rows ``start:end``, as dense logits or HeadRows (not multiplied out)."""
    if isinstance(teacher, HeadRows):
        return HeadRows(teacher.hidden[start:end], teacher.weight)
    return teacher[start:end]


def _chunk_terms(logits: torch.Tensor, start: int, end: int, *, targets: torch.Tensor, teacher: Optional[Teacher],
                 ce_on: bool, weights: tuple, divergence: str, temperature: float, beta: float, lam: float,
                 vocab_size: Optional[int], want_grad: bool):
    """One chunk's weighted total, its unweighted terms (``ce``, ``kd``) and the total's gradient
    w.r.t. the chunk's logits (None when no gradient is wanted)."""
    s = logits.to(torch.promote_types(logits.dtype, torch.float32))
    value = s.new_zeros(())
    grad = None  # the first term's gradient, scaled in place; the second's added to it
    parts: Dict[str, torch.Tensor] = {}
    if ce_on:
        ce, grad = _ce_chunk(s, targets[start:end], want_grad)
        parts["ce"] = ce
        value += weights[0] * ce
        if grad is not None:
            grad.mul_(weights[0])
    if teacher is not None:
        kd, kd_grad = _kd_chunk(s, _teacher_rows(teacher, start, end), divergence=divergence, temperature=temperature,
                                beta=beta, lam=lam, vocab_size=vocab_size, want_grad=want_grad)
        parts["kd"] = kd
        value += weights[1] * kd
        if kd_grad is not None and grad is not None:
            grad[:, :kd_grad.size(1)].add_(kd_grad, alpha=weights[1])
        elif kd_grad is not None:  # the KD term alone (alpha = 0): no second [rows, V] buffer
            grad = _widened(kd_grad.mul_(weights[1]), s.size(1))
    return value, parts, grad


def _widened(grad: torch.Tensor, width: int) -> torch.Tensor:
    """``grad`` [rows, w] with zero columns appended up to ``width`` (the rows past the compared vocabulary)."""
    return grad if grad.size(1) == width else F.pad(grad, (0, width - grad.size(1)))


def _ce_chunk(s: torch.Tensor, targets: torch.Tensor, want_grad: bool):
    """Summed cross-entropy of fp32 logits ``s`` [rows, V] and its gradient ``softmax - onehot``."""
    value = F.cross_entropy(s, targets, reduction="sum")
    if not want_grad:
        return value, None
    grad = s.softmax(-1)
    grad[torch.arange(s.size(0), device=s.device), targets] -= 1.0
    return value, grad


def _teacher_rows(teacher: Teacher, start: int, end: int) -> Union[torch.Tensor, TopK]:
    """The teacher's logits (or TopK) of rows ``start:end``; a teacher's HeadRows are multiplied out here."""
    if isinstance(teacher, TopK):
        return TopK(*(x[start:end] for x in teacher))
    if isinstance(teacher, HeadRows):
        with torch.no_grad():
            return teacher.hidden[start:end] @ teacher.weight.T
    return teacher[start:end]


def _kd_chunk(s: torch.Tensor, teacher: Union[torch.Tensor, TopK], *, divergence: str, temperature: float, beta: float,
              lam: float, vocab_size: Optional[int], want_grad: bool):
    """The chunk's summed divergence times ``temperature ** 2`` over the compared rows, and its
    gradient w.r.t. those columns of ``s`` ([rows, width]; the columns past width get none)."""
    sparse = isinstance(teacher, TopK)
    width = vocab_size or (s.size(1) if sparse else min(s.size(1), teacher.size(1)))
    student = s[:, :width]
    scale = temperature ** 2
    if not sparse and divergence == "forward_kl":  # closed-form gradient, as the unfused loss
        t = teacher[:, :width]
        if not want_grad:
            return forward_kl_chunk(student, t, temperature, s.dtype) * scale, None
        value, grad = forward_kl_chunk_with_grad(student, t, temperature, s.dtype)
        return value * scale, grad.mul_(scale)
    if sparse and divergence == "forward_kl":
        return sparse_forward_kl_chunk(student, teacher.indices.long(), teacher.values, teacher.tail_lse, temperature,
                                       want_grad)
    fn = partial(DIVERGENCES[divergence], beta=beta, lam=lam)
    if sparse:
        per_chunk = partial(_sparse_chunk_sum, indices=teacher.indices.long(), values=teacher.values,
                            tail_lse=teacher.tail_lse, fn=fn, temperature=temperature)
    else:
        per_chunk = partial(_chunk_sum, teacher=teacher[:, :width], fn=fn, temperature=temperature)
    if not want_grad:
        with torch.no_grad():
            return per_chunk(student) * scale, None
    with torch.enable_grad():
        x = student.detach().requires_grad_(True)
        value = per_chunk(x) * scale
        (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad
