"""Vocabulary slices for the fused output layer and loss (:mod:`clpd.losses.fused`): one chunk of
rows, its loss terms and their gradients w.r.t. its hidden states and the output matrix, made
``slice_size`` vocabulary rows at a time, so that nothing wider than ``[rows, slice_size]`` is held
where the row chunk alone would hold ``[rows, V]``.

Every loss here is a sum over the vocabulary of an elementwise function of log-probabilities
``x_v = z_v / T - lse(z / T)`` (cross-entropy: ``-x_y``; each divergence of
:mod:`clpd.losses.divergences`: ``fn(x_student, x_teacher)`` summed over the last dimension). So
with ``g = dL/dx`` and ``c = sum_v g_v`` per row, ``dL/dz_v = (g_v - p_v c) / T`` (``p`` the
student's softmax), and the chunk is done in three passes over the slices:

1. the logsumexps of the student's logits (at 1 for CE, at T for KD) and of the teacher's;
2. each slice's terms and ``g`` (autograd on the slice; ``-onehot`` for CE), accumulating ``c``,
   ``grad_h`` (its ``g`` part and its ``p`` part apart: ``c`` is known only after the last slice)
   and the ``g`` part of each slice's ``grad_W``;
3. the ``p c`` part of ``grad_W``, which needs the final ``c``: the student's slices once more.

The student's logits are made three times (twice for CE alone, or without gradients), a live
teacher's twice. A stored top-k teacher is not sliced: its side is k wide already.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, Optional, Tuple

import torch

from clpd.losses.divergences import DIVERGENCES


def _logits(h: torch.Tensor, weight: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Columns ``lo:hi`` of ``h @ weight.T`` (in the autocast dtype where one is active), as fp32."""
    z = h @ weight[lo:hi].T
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _teacher_slice(teacher, lo: int, hi: int) -> torch.Tensor:
    """Columns ``lo:hi`` of the teacher's logits: of the given [rows, V'] matrix, or made from its rows."""
    if isinstance(teacher, torch.Tensor):
        return teacher[:, lo:hi].float()
    with torch.no_grad():
        return _logits(teacher.hidden, teacher.weight, lo, hi)


def _logsumexps(h, weight, teacher, *, width: int, size: int, temperature: float, ce_on: bool):
    """Pass 1: per row, lse of the student's logits (all V, for CE), of its first ``width`` at
    ``temperature`` and of the teacher's (None where not needed)."""
    def add(acc, z):
        part = torch.logsumexp(z, dim=-1)
        return part if acc is None else torch.logaddexp(acc, part)

    lse_ce = lse_s = lse_t = None
    with torch.no_grad():
        for lo in range(0, weight.size(0), size):
            z = _logits(h, weight, lo, min(lo + size, weight.size(0)))
            if ce_on:
                lse_ce = add(lse_ce, z)
            if teacher is not None and lo < width:
                hi = min(lo + size, width)
                lse_s = add(lse_s, z[:, :hi - lo] / temperature)
                lse_t = add(lse_t, _teacher_slice(teacher, lo, hi) / temperature)
    return lse_ce, lse_s, lse_t


def sliced_rows(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, teacher, *, ce_on: bool,
                weights: tuple, divergence: str, temperature: float, beta: float, lam: float, width: int,
                size: int, want_h: bool, want_w: bool, grad_w: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One row chunk by vocabulary slices: (weighted total, unweighted ``ce``/``kd``, the total's
    gradient w.r.t. ``h`` or None, ``grad_w`` with this chunk's gradient w.r.t. ``weight`` added in
    place, made on first use). ``teacher``: dense logits of these rows or their HeadRows, None without
    a KD term; ``width``: the vocabulary rows the KD term compares."""
    want = want_h or want_w
    lse_ce, lse_s, lse_t = _logsumexps(h, weight, teacher, width=width, size=size, temperature=temperature,
                                       ce_on=ce_on)
    acc = _Sums(h.new_zeros((), dtype=torch.float32), h.new_zeros((), dtype=torch.float32),
                torch.zeros(h.size(0), dtype=torch.float32, device=h.device))
    fn = partial(DIVERGENCES[divergence], beta=beta, lam=lam) if teacher is not None else None
    w_kd = weights[1] * temperature  # d(w * T^2 * kd)/dz = w * T * (g - p c)
    for lo in range(0, weight.size(0), size):
        hi = min(lo + size, weight.size(0))
        z = _logits(h, weight, lo, hi)
        d = _ce_slice(z, targets, lo, lse_ce, weights[0], acc, want) if ce_on else None
        if fn is not None and lo < width:
            k = min(hi, width) - lo
            d = _kd_slice(z, k, _teacher_slice(teacher, lo, lo + k), lse_s, lse_t, fn, temperature, w_kd, acc, d,
                          want, weight[lo:hi])
        if d is not None:
            if want_h:
                acc.grad_h = _add(acc.grad_h, d @ weight[lo:hi].to(d.dtype))
            if want_w:
                grad_w = _put(grad_w, weight, lo, hi, d.T @ h.to(d.dtype))
    if want and fn is not None:  # the -p c part of the KD gradient, now that c is known
        coef = (w_kd * acc.c)[:, None]
        if want_h:
            acc.grad_h = acc.grad_h - coef * acc.p_h
        if want_w:  # pass 3: each slice's softmax once more
            scaled = coef * h.to(coef.dtype)
            for lo in range(0, width, size):
                hi = min(lo + size, width)
                p = (_logits(h, weight, lo, hi) / temperature - lse_s[:, None]).exp_()
                grad_w = _put(grad_w, weight, lo, hi, -(p.T @ scaled))
    parts = {**({"ce": acc.ce + lse_ce.sum()} if ce_on else {}),
             **({"kd": acc.kd * temperature ** 2} if fn is not None else {})}
    total = sum(w * parts[name] for w, name in ((weights[0], "ce"), (weights[1], "kd")) if name in parts)
    return total, parts, None if acc.grad_h is None else acc.grad_h.to(h.dtype), grad_w


@dataclass
class _Sums:
    """What the slices of one row chunk add up: -sum of gold logits (CE), the divergence, c per row,
    and the two parts of the gradient w.r.t. the hidden states."""
    ce: torch.Tensor
    kd: torch.Tensor
    c: torch.Tensor
    grad_h: Optional[torch.Tensor] = None
    p_h: Optional[torch.Tensor] = None


def _ce_slice(z: torch.Tensor, targets: torch.Tensor, lo: int, lse_ce: torch.Tensor, w_ce: float, acc: _Sums,
              want: bool) -> Optional[torch.Tensor]:
    """The slice's gold logits into ``acc.ce``; its CE gradient ``w * (softmax - onehot)`` (or None)."""
    rows = torch.arange(z.size(0), device=z.device)
    inside = (targets >= lo) & (targets < lo + z.size(1))
    acc.ce = acc.ce - z[rows[inside], targets[inside] - lo].sum()
    if not want:
        return None
    d = (z - lse_ce[:, None]).exp_().mul_(w_ce)
    d[rows[inside], targets[inside] - lo] -= w_ce
    return d


def _kd_slice(z, k: int, t, lse_s, lse_t, fn, temperature: float, w_kd: float, acc: _Sums,
              d: Optional[torch.Tensor], want: bool, weight: torch.Tensor) -> Optional[torch.Tensor]:
    """The slice's divergence (its first ``k`` columns) into ``acc.kd``; with gradients, ``g`` into
    ``d`` (made here if CE made none), ``sum g`` into ``acc.c`` and ``p @ W`` into ``acc.p_h``."""
    x = (z[:, :k] / temperature - lse_s[:, None]).requires_grad_(want)
    with torch.enable_grad() if want else torch.no_grad():
        value = fn(x, t / temperature - lse_t[:, None]).sum()
    acc.kd = acc.kd + value.detach()
    if not want:
        return d
    (g,) = torch.autograd.grad(value, x)
    acc.c += g.sum(-1)
    d = torch.zeros_like(z) if d is None else d
    d[:, :k] += w_kd * g
    acc.p_h = _add(acc.p_h, x.detach().exp() @ weight[:k].to(g.dtype))
    return d


def _add(acc: Optional[torch.Tensor], part: torch.Tensor) -> torch.Tensor:
    return part if acc is None else acc.add_(part)


def _put(grad_w: Optional[torch.Tensor], weight: torch.Tensor, lo: int, hi: int, part: torch.Tensor) -> torch.Tensor:
    """``grad_w[lo:hi] += part``, ``grad_w`` a zero [V, H] in the weight's dtype on first use."""
    if grad_w is None:
        grad_w = torch.zeros_like(weight)
    grad_w[lo:hi] += part.to(weight.dtype)
    return grad_w

