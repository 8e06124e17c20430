"""``kd_loss_sum``: the summed token-level divergence between student and teacher logits over the
answer positions, in chunks; forward KL with its gradient written out (:class:`_ForwardKL`)."""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from clpd.data.records import IGNORE_INDEX
from clpd.losses.chunks import _chunked_sum, _kd_problems, _raise_if, answer_rows
from clpd.losses.divergences import DIVERGENCES, LOG_PROB_FLOOR, Divergence







def _chunk_sum(student: torch.Tensor, teacher: torch.Tensor, fn: Divergence, temperature: float) -> torch.Tensor:
    """Summed divergence of one chunk of [rows, V] logits, computed in (at least) fp32."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    student, teacher = student.to(dtype), teacher.to(dtype)
    if temperature != 1.0:
        student, teacher = student / temperature, teacher / temperature
    return fn(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1)).sum()


def kd_loss_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
                divergence: str, temperature: float = 1.0, beta: float = 0.5, lam: float = 0.1,
                chunk_size: int = 256, vocab_size: Optional[int] = None) -> torch.Tensor:
    """Summed token-level divergence between student and teacher over the answer tokens
    (``targets != -100``), times ``temperature ** 2``; an fp32 scalar (fp64 if the logits are).

    - Vocabulary: only the first ``min(Vs, Vt)`` rows of both are compared (one family shares a
      tokenizer but pads its output matrices differently: Qwen2.5 151936 vs 152064 rows);
      ``vocab_size`` (the tokenizer's size) cuts both further, so padded rows never take part.
    - Memory: answer positions are selected first, then processed ``chunk_size`` rows at a time,
      each chunk cast to fp32 and wrapped in a non-reentrant activation checkpoint when grad is on,
      so at most one chunk's fp32 ``[chunk, V]`` temporaries are alive at a time, in forward and in
      backward; up to ``RECOMPUTE_ABOVE`` [rows, V] elements the rows are one kept chunk instead.
      ``forward_kl`` keeps no temporaries at all (:class:`_ForwardKL`, same chunks).
    - Temperature: both distributions are softened by ``temperature`` and the result is scaled by
      ``temperature ** 2`` (Hinton et al.: keeps the gradient scale independent of T), for every
      divergence.
    - ``beta`` is used by ``jsd`` only, ``lam`` by the skew divergences only.

    Teacher logits must not require grad (compute them under ``torch.no_grad()``); the result is
    differentiable w.r.t. the student logits.
    """
    problems = _kd_problems(divergence, temperature, beta, lam, chunk_size, vocab_size)
    if teacher_logits.requires_grad:
        problems.append("teacher_logits require grad: compute them under torch.no_grad() (or detach them)")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1] or student_logits.shape[:-1] != targets.shape:
        problems.append(f"shapes do not line up: student_logits {tuple(student_logits.shape)}, "
                        f"teacher_logits {tuple(teacher_logits.shape)}, targets {tuple(targets.shape)} "
                        "(expected [B, T, V], [B, T, V'], [B, T])")
    width = min(student_logits.size(-1), teacher_logits.size(-1))
    if vocab_size is not None and vocab_size > width:
        problems.append(f"vocab_size {vocab_size} exceeds the logits' shared width {width} "
                        f"(student {student_logits.size(-1)}, teacher {teacher_logits.size(-1)})")
    _raise_if(problems)
    if vocab_size is not None:
        width = vocab_size

    answer = targets != IGNORE_INDEX
    student = answer_rows(student_logits[..., :width], answer)  # [N, width], in the logits' own dtype
    # (Teacher logits made under inference_mode are copied here all the same: activation checkpoints
    # cannot keep inference tensors. The loop runs its teacher under no_grad, which needs no copy.)
    teacher = teacher_logits[..., :width]
    teacher = teacher[answer] if teacher.is_inference() else answer_rows(teacher, answer)
    if student.size(0) == 0:
        return student.float().sum()  # 0, still attached to the graph so backward() works

    if divergence == "forward_kl":  # the common KD loss: its gradient is closed-form (below)
        return _ForwardKL.apply(student, teacher, temperature, chunk_size) * temperature ** 2
    per_chunk = partial(_chunk_sum, fn=partial(DIVERGENCES[divergence], beta=beta, lam=lam), temperature=temperature)
    return _chunked_sum(per_chunk, student, teacher, chunk_size=chunk_size) * temperature ** 2


class _ForwardKL(torch.autograd.Function):
    """``forward_kl`` summed over [N, V] rows, with its gradient written out instead of recorded.

    The generic path records every fp32 [chunk, V] temporary of the divergence for autograd (and,
    chunked, computes them all a second time in backward), then walks them back op by op.
    KL(p_t || softmax(s)) has the closed-form gradient ``softmax(s) * sum(w) - w`` with w = p_t
    (zeroed where the student's log-probability is below ``LOG_PROB_FLOOR``, where the generic
    path's floor stops the gradient): forward and backward each compute a chunk's two softmaxes
    once, in place where they can, and only the two input matrices are kept, at any vocabulary
    size. The value is the generic formula's; the gradient agrees with autograd's to float
    rounding (tests/test_losses.py). What it saves in a step: docs/benchmarks.md, clpd against TRL (SmolLM2 shapes)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, chunk_size: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.promote_types(student.dtype, torch.float32), device=student.device)
        for s, t in zip(student.split(chunk_size), teacher.split(chunk_size)):
            total += forward_kl_chunk(s, t, temperature, total.dtype)
        ctx.save_for_backward(student, teacher)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        student, teacher = ctx.saved_tensors
        out = torch.empty_like(student)
        for s, t, g in zip(student.split(ctx.chunk_size), teacher.split(ctx.chunk_size), out.split(ctx.chunk_size)):
            g.copy_(forward_kl_chunk_grad(s, t, ctx.temperature, grad.dtype).mul_(grad))
        return out, None, None, None


def forward_kl_chunk(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                     dtype: torch.dtype) -> torch.Tensor:
    """Summed ``forward_kl`` of one chunk of [rows, V] logits at ``temperature`` (not times T ** 2),
    in ``dtype``, without recording anything for autograd."""
    s_logp, t_logp = (_tempered(x, temperature, dtype).log_softmax(-1) for x in (student, teacher))
    p = t_logp.exp()
    gap = t_logp.clamp_(min=LOG_PROB_FLOOR).sub_(s_logp.clamp_(min=LOG_PROB_FLOOR))
    return p.mul_(gap).sum()


def forward_kl_chunk_grad(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                          dtype: torch.dtype) -> torch.Tensor:
    """The gradient of :func:`forward_kl_chunk` w.r.t. the student logits, [rows, V] in ``dtype``:
    ``(softmax(s / T) * sum(w) - w) / T`` with ``w = softmax(t / T)``, zeroed where the student's
    log-probability is below the floor (where the generic path's floor stops the gradient)."""
    p = _tempered(student, temperature, dtype).log_softmax(-1)
    w = _tempered(teacher, temperature, dtype).softmax(-1)
    w.masked_fill_(p < LOG_PROB_FLOOR, 0.0)  # rows so unlikely that the floor stops their gradient
    return p.exp_().mul_(w.sum(-1, keepdim=True)).sub_(w).div_(temperature)


def forward_kl_chunk_with_grad(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`forward_kl_chunk` and :func:`forward_kl_chunk_grad` at once, sharing the two softmaxes
    (the fused loss needs both in one pass)."""
    s_logp, t_logp = (_tempered(x, temperature, dtype).log_softmax(-1) for x in (student, teacher))
    p = t_logp.exp()
    value = t_logp.clamp_(min=LOG_PROB_FLOOR).sub_(s_logp.clamp(min=LOG_PROB_FLOOR)).mul_(p).sum()
    del t_logp
    p.masked_fill_(s_logp < LOG_PROB_FLOOR, 0.0)  # rows so unlikely that the floor stops their gradient
    return value, s_logp.exp_().mul_(p.sum(-1, keepdim=True)).sub_(p).div_(temperature)


def _tempered(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """``logits / temperature`` in ``dtype`` (possibly ``logits`` itself: not to be changed in place)."""
    x = logits.to(dtype)
    return x if temperature == 1.0 else x / temperature




