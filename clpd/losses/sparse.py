"""Stored (top-k) teacher outputs: :class:`TopK`, how it is built from logits, and the divergences
against it with one tail bucket (``sparse_kd_loss_sum``; what is exact and what is approximate is in
:mod:`clpd.losses`)."""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from clpd.data.records import IGNORE_INDEX
from clpd.losses.chunks import _chunked_sum, _kd_problems, _raise_if, answer_rows
from clpd.losses.divergences import Divergence
from clpd.losses.divergences import DIVERGENCES, LOG_PROB_FLOOR


class TopK(NamedTuple):
    """A teacher's outputs stored sparsely, one row per answer position (``targets != -100``) of a
    micro-batch, in row-major order: the order ``student_logits[targets != -100]`` selects.

    ``indices``: [N, k] int64 (or int32) vocabulary rows in [0, width), the teacher's top k;
    ``values``: [N, k] fp32 logits at those rows, at temperature 1;
    ``tail_lse``: [N] fp32 logsumexp of the teacher's logits over the other ``width - k`` rows
    (-inf when k == width). ``width`` is the number of vocabulary rows compared (``vocab_size``).
    """
    indices: torch.Tensor
    values: torch.Tensor
    tail_lse: torch.Tensor



def top_k_outputs(logits: torch.Tensor, k: int, width: int) -> TopK:
    """The :class:`TopK` of dense ``[N, V]`` logits (already the answer rows) over their first
    ``width`` rows, computed in (at least) fp32 and without grad. ``tail_lse`` is the logsumexp of
    the ``width - k`` rows outside the top k (-inf when k == width), so
    ``logsumexp(cat(values, tail_lse))`` is the logsumexp of ``logits[:, :width]``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if not 1 <= width <= logits.size(-1):
        raise ValueError(f"width must be in [1, {logits.size(-1)}] (the logits' rows), got {width}")
    if not 1 <= k <= width:
        raise ValueError(f"k must be in [1, width={width}], got {k}")
    with torch.no_grad():
        x = logits[:, :width].to(torch.promote_types(logits.dtype, torch.float32))
        values, indices = x.topk(k, dim=-1)
        if k == width:
            tail_lse = x.new_full((x.size(0),), -math.inf)
        else:
            tail_lse = x.scatter(-1, indices, -math.inf).logsumexp(-1)
    return TopK(indices, values, tail_lse)



def tempered_tail_lse(tail_lse: torch.Tensor, n_tail: int, temperature: float) -> torch.Tensor:
    """The teacher's tail bucket logit at ``temperature``, from its T = 1 logsumexp over ``n_tail``
    rows: ``(tail_lse - log n) / T + log n``, the tempered logsumexp of a FLAT tail (n equal logits)
    of the same T = 1 mass.

    Exact at T = 1 (it is ``tail_lse``) and for a tail whose logits are all equal. Otherwise, by the
    power-mean inequality (with x_i = exp(l_i) and r = 1 / T: mean(x^r)^(1/r) <= mean(x) for r < 1,
    >= for r > 1), it is an UPPER bound on the true tempered tail ``logsumexp(l_i / T)`` for T > 1
    and a LOWER bound for T < 1: a tail that is really uneven gets more softened mass than it should
    at T > 1, and less at T < 1.
    """
    log_n = math.log(n_tail)
    return (tail_lse - log_n) / temperature + log_n



def _sparse_chunk_sum(student: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, tail_lse: torch.Tensor,
                      fn: Divergence, temperature: float) -> torch.Tensor:
    """Summed divergence of one chunk: student [rows, width] logits against the teacher's top k,
    both coarsened to the teacher's k rows plus (when k < width) one tail bucket."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    student, teacher = student.to(dtype), values.to(dtype)
    if temperature != 1.0:
        student, teacher = student / temperature, teacher / temperature
    s_full = F.log_softmax(student, dim=-1)  # exact: over all width rows
    s_logp = s_full.gather(-1, indices)
    width, k = student.size(-1), indices.size(-1)
    if k < width:
        # The student's tail bucket: its mass outside the teacher's k rows. The k rows are masked with
        # the most negative finite number rather than -inf: exp() of it is 0 all the same, but a student
        # whose every tail row is -inf then gets a finite gradient (logsumexp's backward computes
        # exp(x - lse), NaN for x = lse = -inf).
        s_tail = s_full.scatter(-1, indices, torch.finfo(dtype).min).logsumexp(-1, keepdim=True)
        t_tail = tempered_tail_lse(tail_lse.to(dtype), width - k, temperature).unsqueeze(-1)
        s_logp = torch.cat([s_logp, s_tail], dim=-1)
        teacher = torch.cat([teacher, t_tail], dim=-1)
    # With k == width there is no tail column at all, so nothing computes -inf - (-inf).
    return fn(s_logp, F.log_softmax(teacher, dim=-1)).sum()



def sparse_forward_kl_chunk(student: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, tail_lse: torch.Tensor,
                            temperature: float, want_grad: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`_sparse_chunk_sum` for ``forward_kl``, times ``temperature ** 2``, with its gradient
    w.r.t. ``student`` written out (None unless ``want_grad``), nothing recorded for autograd.

    With ``w_b`` the teacher's bucket probabilities (zero where the student's bucket log-probability
    is below the floor, where the generic path's floor stops the gradient), ``q`` the student's
    softmax at temperature T and ``Q_tail`` its tail mass, the gradient w.r.t. ``student / T`` is
    ``q_j * sum(w) - w_j`` on a teacher row and ``q_j * sum(w) - w_tail * q_j / Q_tail`` on a tail row."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    x, teacher = student.to(dtype), values.to(dtype)
    if temperature != 1.0:
        x, teacher = x / temperature, teacher / temperature
    s_full = F.log_softmax(x, dim=-1)
    s_buckets = s_full.gather(-1, indices)
    width, k = x.size(-1), indices.size(-1)
    tail = k < width
    if tail:
        s_tail = s_full.scatter(-1, indices, torch.finfo(dtype).min).logsumexp(-1, keepdim=True)
        s_buckets = torch.cat([s_buckets, s_tail], dim=-1)
        teacher = torch.cat([teacher, tempered_tail_lse(tail_lse.to(dtype), width - k, temperature).unsqueeze(-1)], -1)
    t_logp = F.log_softmax(teacher, dim=-1)
    value = DIVERGENCES["forward_kl"](s_buckets, t_logp).sum() * temperature ** 2
    if not want_grad:
        return value, None
    w = t_logp.exp().masked_fill_(s_buckets < LOG_PROB_FLOOR, 0.0)
    total = w.sum(-1, keepdim=True)
    top = s_buckets[:, :k].exp().mul_(total).sub_(w[:, :k])  # the teacher rows' gradient
    grad = s_full.exp().mul_(total)
    if tail:  # s_full is not needed after this: turned in place into q_j / Q_tail
        grad.sub_(s_full.sub_(s_tail).exp_().mul_(w[:, k:]))
    del s_full
    grad.scatter_(-1, indices, top)
    return value, grad.mul_(temperature)  # d/d(student) = d/d(student / T) / T, times T ** 2


def sparse_kd_loss_sum(student_logits: torch.Tensor, teacher: TopK, targets: torch.Tensor, *,
                       divergence: str, temperature: float = 1.0, beta: float = 0.5, lam: float = 0.1,
                       chunk_size: int = 256, vocab_size: Optional[int] = None) -> torch.Tensor:
    """:func:`kd_loss_sum` against a stored top-k teacher: the summed divergence over the answer
    tokens between the (k+1)-bucket coarsenings of student and teacher (the teacher's k rows, and one
    bucket for the other ``width - k``), times ``temperature ** 2``; an fp32 scalar (fp64 if the
    student logits are).

    - Width: the first ``vocab_size`` rows of the student (all of its rows when None) are compared;
      it must be the ``width`` the :class:`TopK` was built with (a teacher narrower than the student
      needs ``vocab_size`` set to its width: the TopK does not record it).
    - Teacher at temperature T: bucket logits ``cat(values / T, tempered_tail_lse(tail_lse, width - k,
      T))``, normalised (exact at T = 1; a flat-tail approximation otherwise, see
      :func:`tempered_tail_lse`). Student: ``log_softmax(student[:, :width] / T)`` over all width rows,
      gathered at the teacher's rows, its tail bucket the logsumexp of the rest.
    - k == width: no tail bucket; value and gradient equal :func:`kd_loss_sum`'s.
    - Rows: ``student_logits`` [B, T, V] with ``targets`` [B, T], or answer rows already selected,
      [N, V] with [N] targets; either way the teacher has one row per answer position, in that order.
    - Memory, chunking, checkpointing, ``beta``/``lam`` and the T ** 2 scale: as :func:`kd_loss_sum`.
    """
    problems = _kd_problems(divergence, temperature, beta, lam, chunk_size, vocab_size)
    if student_logits.dim() < 2 or student_logits.shape[:-1] != targets.shape:
        problems.append(f"shapes do not line up: student_logits {tuple(student_logits.shape)}, targets "
                        f"{tuple(targets.shape)} (expected [B, T, V], [B, T], or answer rows: [N, V], [N])")
    width = student_logits.size(-1)
    if vocab_size is not None and vocab_size > width:
        problems.append(f"vocab_size {vocab_size} exceeds the student logits' width {width}")
    _raise_if(problems)
    if vocab_size is not None:
        width = vocab_size
    answer = targets != IGNORE_INDEX
    n_answer = int(answer.sum())
    indices, values, tail_lse = teacher
    if indices.dim() != 2 or values.shape != indices.shape or tail_lse.shape != indices.shape[:1]:
        problems.append(f"teacher TopK shapes do not line up: indices {tuple(indices.shape)}, values "
                        f"{tuple(values.shape)}, tail_lse {tuple(tail_lse.shape)} (expected [N, k], [N, k], [N])")
    elif indices.size(0) != n_answer:
        problems.append(f"teacher TopK has {indices.size(0)} rows but targets have {n_answer} answer positions "
                        "(targets != -100): one teacher row per answer position, in row-major order")
    elif not 1 <= indices.size(1) <= width:
        problems.append(f"teacher TopK k = {indices.size(1)} must be in [1, width = {width}]")
    # The range is checked on the CPU only: on CUDA reading it would make the host wait for the device.
    elif n_answer and not indices.is_cuda and (int(indices.min()) < 0 or int(indices.max()) >= width):
        problems.append(f"teacher TopK indices must be in [0, width = {width}), got "
                        f"[{int(indices.min())}, {int(indices.max())}]")
    if indices.dtype not in (torch.int64, torch.int32):
        problems.append(f"teacher TopK indices must be int64 or int32, got {indices.dtype}")
    if values.requires_grad or tail_lse.requires_grad:
        problems.append("teacher TopK values / tail_lse require grad: compute them under torch.no_grad() "
                        "(or detach them)")
    _raise_if(problems)

    student = answer_rows(student_logits[..., :width], answer)  # [N, width], in the logits' own dtype
    if n_answer == 0:
        return student.float().sum()  # 0, still attached to the graph so backward() works

    per_chunk = partial(_sparse_chunk_sum, fn=partial(DIVERGENCES[divergence], beta=beta, lam=lam),
                        temperature=temperature)
    return _chunked_sum(per_chunk, student, indices.long(), values, tail_lse, chunk_size=chunk_size) * temperature ** 2
