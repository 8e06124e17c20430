"""Token-level training losses as pure functions of logits and targets.

Targets are already shifted (``targets[:, t]`` is the token after position t) and hold -100 where
no loss is taken (prompt and padding). Each function returns the *sum* over answer tokens: the
training loop divides by the answer tokens of the whole accumulated batch, so every answer token
weighs the same however the batch was split into micro-batches.

Three layers:

* ``DIVERGENCES``: per-token divergences, pure functions of fp32 log-probabilities
  ``(s_logp, t_logp)`` of shape ``[N, V]`` (s = student, t = teacher) returning ``[N]``.
* ``kd_loss_sum``: logits in, summed divergence out; aligns vocabularies, keeps only answer
  positions, and works through them in chunks (checkpointed when large, or for ``forward_kl`` with
  its gradient written out) so memory stays bounded for a 152k-row vocabulary.
* ``distill_loss``: what the loop calls; ``alpha * CE + (1 - alpha) * KD``, or plain CE for
  ``"sft"``, returned with its two terms apart (:class:`LossTerms`) so that both can be logged.

Stored (top-k) teachers. A teacher's outputs can be stored sparsely as :class:`TopK` (built by
``top_k_outputs``): per answer row, its k largest logits over the ``width`` compared vocabulary rows
and ``tail_lse``, the logsumexp of the other ``width - k``. ``sparse_kd_loss_sum`` (and
``distill_loss`` given a ``TopK``) then computes each divergence between the (k+1)-bucket
coarsenings of the two distributions: the teacher's k rows, and one tail bucket holding everything
else; the student's side is exact (a softmax over all ``width`` rows, summed into the buckets).
What is exact: with k == width there is no tail bucket and every divergence, and its gradient,
equals the dense one (up to summation order); at T = 1 with k < width the result is the exact
divergence between the two coarsenings, which by the data-processing inequality is <= the full
divergence (every divergence here is an f-divergence, so coarsening can only lose information).
What is approximate: the tail bucket hides how the mass inside it is spread, so the loss neither
sees nor pushes on the student's distribution within the tail, only its total; and at T != 1 the
teacher's tempered tail is not recoverable from ``tail_lse``, so it is taken as that of a flat tail
with the same T = 1 mass (see ``tempered_tail_lse``).

Adding a divergence is one function and one entry in ``DIVERGENCES``: ``distill.loss`` takes its
allowed values from ``LOSS_NAMES`` (clpd/config.py builds its enum from it). A divergence takes
``(s_logp, t_logp, **knobs)``: the knobs are ``beta`` and ``lam`` (``distill.beta``,
``distill.skew_lambda``); each function names the one it uses and ignores the others.

Zero probabilities. A ``-inf`` logit (a masked vocabulary row) gives a zero probability and a
``-inf`` log-probability, and large logit gaps underflow probabilities to zero. Inside the
divergences ``0 * log 0`` counts as 0, and a log-probability below ``LOG_PROB_FLOOR`` (the log of
the smallest normal fp32 number, about -87.3) is read as ``LOG_PROB_FLOOR``: probabilities fp32
cannot hold anyway count as 1.2e-38 inside logarithms. This keeps every value and gradient finite.
The one place it changes a result is where the exact answer is +inf: student mass on a row the
teacher gives zero probability under reverse KL (or teacher mass on a row the student gives zero
under forward KL) costs about 87 nats per unit of mass instead of infinity, and the gradient pushes
that mass off the row.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Dict, List, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # the target of tokens no loss is taken on (prompt, padding), as torch's cross_entropy expects

# log of the smallest normal fp32 number (~ -87.34): see the module docstring.
LOG_PROB_FLOOR = math.log(torch.finfo(torch.float32).tiny)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the gold tokens, in fp32 whatever the logits' dtype.

    Only answer rows are cast to fp32: casting all [B*T, V] logits would cost an extra 2.5 GB per
    step at 8 x 512 tokens with Qwen's 152k-row vocabulary, half of it on prompt rows.
    """
    answer = targets != IGNORE_INDEX
    return F.cross_entropy(answer_rows(logits, answer).float(), answer_rows(targets, answer), reduction="sum")


def answer_rows(x: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """``x[answer]``, without the copy when ``x`` holds nothing else: the training loop hands in
    logits of answer positions only ([N, V], transformers' ``logits_to_keep``), and copying them
    would cost one more [N, V] matrix (and a zero-filled gradient of that size in backward)."""
    return x if answer.dim() == 1 and bool(answer.all()) else x[answer]


# --------------------------------------------------------------------------------------------
# Per-token divergences: [N, V] log-probabilities in, [N] out.
# --------------------------------------------------------------------------------------------

def _floor(logp: torch.Tensor) -> torch.Tensor:
    return logp.clamp(min=LOG_PROB_FLOOR)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q) over the last dim, with 0 log 0 = 0.

    ``p`` comes from the unfloored log-probabilities, so a row with ``logp = -inf`` has p = 0
    exactly and contributes 0 (and a zero gradient); the logarithms are floored so that the
    difference is always finite.
    """
    return (logp.exp() * (_floor(logp) - _floor(logq))).sum(-1)


def _log_mixture(logp: torch.Tensor, logq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * p + (1 - w) * q) for 0 < w < 1, computed in log space (no underflow)."""
    return torch.logaddexp(_floor(logp) + math.log(w), _floor(logq) + math.log1p(-w))


def _check_unit_interval(name: str, value: float, *, include_one: bool) -> None:
    ok = 0.0 <= value <= 1.0 if include_one else 0.0 <= value < 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{']' if include_one else ')'}, got {value}")


def forward_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, **_) -> torch.Tensor:
    """KL(teacher || student) = sum_v p_t (log p_t - log p_s): mean-seeking; the classic KD loss
    (Hinton et al. 2015). Its gradient w.r.t. the student logits is p_s - p_t."""
    return _kl(t_logp, s_logp)


def reverse_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, **_) -> torch.Tensor:
    """KL(student || teacher) = sum_v p_s (log p_s - log p_t): mode-seeking (MiniLLM, GKD)."""
    return _kl(s_logp, t_logp)


def jsd(s_logp: torch.Tensor, t_logp: torch.Tensor, *, beta: float = 0.5, **_) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy Distillation
    of Language Models: Learning from Self-Generated Mistakes", Eq. 1), ``beta`` weighting the
    TEACHER:

        M = beta * P_T + (1 - beta) * P_S
        JSD(beta) = beta * KL(P_T || M) + (1 - beta) * KL(P_S || M)

    This is exactly what TRL's ``GKDTrainer.generalized_jsd_loss`` computes for 0 < beta < 1
    (mixture ``logsumexp([s + log(1 - beta), t + log(beta)])``, ``beta * kl_teacher +
    (1 - beta) * kl_student``). beta = 0.5 is the symmetric JSD, bounded by log 2.

    Endpoints, as TRL handles them: the formula above is identically 0 at beta = 0 and beta = 1
    (M equals one of the two distributions and that term's weight vanishes), so, like TRL, beta = 0
    returns the forward KL(P_T || P_S) and beta = 1 the reverse KL(P_S || P_T). These are the limits
    of JSD(beta) / beta as beta -> 0 and of JSD(beta) / (1 - beta) as beta -> 1, NOT of JSD(beta):
    the loss jumps at the endpoints, and near them beta mostly scales the loss (JSD(0.01) is about
    0.01 * forward KL). So beta = 0.9 is roughly "a tenth of a reverse-KL-like loss", not "almost reverse KL";
    for pure forward / reverse KL prefer the ``forward_kl`` / ``reverse_kl`` divergences.
    """
    _check_unit_interval("beta", beta, include_one=True)
    if beta == 0.0:
        return forward_kl(s_logp, t_logp)
    if beta == 1.0:
        return reverse_kl(s_logp, t_logp)
    log_m = _log_mixture(t_logp, s_logp, beta)
    return beta * _kl(t_logp, log_m) + (1.0 - beta) * _kl(s_logp, log_m)


def skew_forward_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, *, lam: float = 0.1, **_) -> torch.Tensor:
    """Skew KL of DistiLLM (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large
    Language Models", ICML): with p = teacher and q = student,

        SKL(lam) = KL(p || lam * p + (1 - lam) * q)

    as in the authors' ``distillm/losses.py::skewed_forward_kl`` (``mixed_probs = lam *
    teacher_probs + (1 - lam) * student_probs``; their code drops the constant teacher-entropy
    term, which changes the value but not the gradient; here it is kept, so SKL is 0 at p = q).
    The gradient flows through the mixture too, as in theirs. lam = 0 is the forward KL; the
    paper's default is lam = 0.1; lam must be < 1 (at 1 the loss is identically 0).
    """
    _check_unit_interval("lam", lam, include_one=False)
    if lam == 0.0:
        return forward_kl(s_logp, t_logp)
    return _kl(t_logp, _log_mixture(t_logp, s_logp, lam))


def skew_reverse_kl(s_logp: torch.Tensor, t_logp: torch.Tensor, *, lam: float = 0.1, **_) -> torch.Tensor:
    """Skew reverse KL of DistiLLM (Ko et al. 2024): with p = teacher and q = student,

        SRKL(lam) = KL(q || (1 - lam) * p + lam * q)

    as in ``distillm/losses.py::skewed_reverse_kl`` (``mixed_probs = (1 - lam) * teacher_probs +
    lam * student_probs``). lam = 0 is the reverse KL; lam must be < 1.
    """
    _check_unit_interval("lam", lam, include_one=False)
    if lam == 0.0:
        return reverse_kl(s_logp, t_logp)
    return _kl(s_logp, _log_mixture(s_logp, t_logp, lam))


def tvd(s_logp: torch.Tensor, t_logp: torch.Tensor, **_) -> torch.Tensor:
    """Total variation distance 0.5 * sum_v |p_t - p_s|, in [0, 1] and symmetric (DistiLLM's
    ``tv_distance``)."""
    return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)


Divergence = Callable[..., torch.Tensor]

DIVERGENCES: Dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}

LOSS_NAMES = ("sft", *DIVERGENCES)


# --------------------------------------------------------------------------------------------
# Logits in, summed loss out.
# --------------------------------------------------------------------------------------------

def _kd_problems(divergence: str, temperature: float, beta: float, lam: float, chunk_size: int,
                 vocab_size: Optional[int]) -> List[str]:
    problems = []
    if divergence not in DIVERGENCES:
        problems.append(f"unknown divergence {divergence!r}; expected one of: {', '.join(DIVERGENCES)}")
    if not temperature > 0:
        problems.append(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        problems.append(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= lam < 1.0:
        problems.append(f"lam must be in [0, 1), got {lam}")
    if chunk_size < 1:
        problems.append(f"chunk_size must be >= 1, got {chunk_size}")
    if vocab_size is not None and vocab_size < 1:
        problems.append(f"vocab_size must be >= 1 or None, got {vocab_size}")
    return problems


def _raise_if(problems: List[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))


# Up to this many [rows, vocabulary] elements (64 MiB of fp32) the loss is one chunk whose fp32
# temporaries are kept for backward: recomputing chunks costs a second forward of the loss, and
# splitting small ones costs kernel launches, for a few MiB saved (clpd.bench.store step,
# arith micro student, 100 rows: stored KD went from 1.16x to about 1.1x SFT's step). A 152k-row
# vocabulary crosses it from 111 answer rows on, and is then chunked and recomputed.
RECOMPUTE_ABOVE = 1 << 24


def needs_recompute(rows: torch.Tensor) -> bool:
    """Whether the chunked loss over ``rows`` ([N, width] logits) recomputes its chunks in backward."""
    return torch.is_grad_enabled() and rows.requires_grad and rows.numel() > RECOMPUTE_ABOVE


def rows_per_chunk(rows: torch.Tensor, chunk_size: int) -> int:
    """``chunk_size``, or all of ``rows`` in one chunk where they are small: below RECOMPUTE_ABOVE
    every chunk's temporaries are kept for backward anyway, and each further chunk only costs time."""
    return chunk_size if rows.numel() > RECOMPUTE_ABOVE else max(chunk_size, rows.size(0))


def _chunked_sum(per_chunk: Callable[..., torch.Tensor], student: torch.Tensor, *teacher: torch.Tensor,
                 chunk_size: int) -> torch.Tensor:
    """``per_chunk(student_rows, *teacher_rows)`` summed over chunks of the rows: large losses are
    cut into ``chunk_size`` rows, each recomputed in backward (a non-reentrant activation checkpoint)
    instead of keeping its fp32 [chunk, V] temporaries; small ones are one kept chunk."""
    rows = rows_per_chunk(student, chunk_size)
    recompute = needs_recompute(student)
    # split (not slicing in a loop): one backward node, one concatenated gradient
    chunks = zip(student.split(rows), *(t.split(rows) for t in teacher))
    sums = [checkpoint(per_chunk, *c, use_reentrant=False) if recompute else per_chunk(*c) for c in chunks]
    return torch.stack(sums).sum()


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
    rounding (tests/test_losses.py). What it saves in a step: README, "Against TRL" (SmolLM2 shapes)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float, chunk_size: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.promote_types(student.dtype, torch.float32), device=student.device)
        for s, t in zip(student.split(chunk_size), teacher.split(chunk_size)):
            s_logp, t_logp = (_tempered(x, temperature, total.dtype).log_softmax(-1) for x in (s, t))
            p = t_logp.exp()
            gap = t_logp.clamp_(min=LOG_PROB_FLOOR).sub_(s_logp.clamp_(min=LOG_PROB_FLOOR))
            total += p.mul_(gap).sum()
        ctx.save_for_backward(student, teacher)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        student, teacher = ctx.saved_tensors
        out = torch.empty_like(student)
        for s, t, g in zip(student.split(ctx.chunk_size), teacher.split(ctx.chunk_size), out.split(ctx.chunk_size)):
            p = _tempered(s, ctx.temperature, grad.dtype).log_softmax(-1)
            w = _tempered(t, ctx.temperature, grad.dtype).softmax(-1)
            w.masked_fill_(p < LOG_PROB_FLOOR, 0.0)  # rows so unlikely that the floor stops their gradient
            p.exp_().mul_(w.sum(-1, keepdim=True)).sub_(w).mul_(grad / ctx.temperature)  # d/d(s / T), times dL/dsum
            g.copy_(p)
        return out, None, None, None


def _tempered(logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """``logits / temperature`` in ``dtype`` (possibly ``logits`` itself: not to be changed in place)."""
    x = logits.to(dtype)
    return x if temperature == 1.0 else x / temperature


# --------------------------------------------------------------------------------------------
# Stored (top-k) teacher outputs: sparse divergences with one tail bucket.
# --------------------------------------------------------------------------------------------

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


class LossTerms(NamedTuple):
    """A loss summed over answer tokens, and its two terms unweighted (None where not computed):
    ``total = alpha * ce + (1 - alpha) * kd``."""
    total: torch.Tensor
    ce: Optional[torch.Tensor] = None
    kd: Optional[torch.Tensor] = None


def distill_loss(student_logits: torch.Tensor, teacher_logits: Optional[Union[torch.Tensor, TopK]],
                 targets: torch.Tensor, *,
                 loss: str, alpha: float, temperature: float = 1.0, beta: float = 0.5, lam: float = 0.1,
                 chunk_size: int = 256, vocab_size: Optional[int] = None) -> LossTerms:
    """The loop's loss, summed over answer tokens, with its terms.

    ``loss == "sft"``: cross-entropy on the gold tokens; ``teacher_logits`` and the KD knobs are
    ignored (the teacher may be None). Otherwise ``loss`` names a divergence and the total is
    ``alpha * CE + (1 - alpha) * KD`` (``alpha`` weighs the CE term, the opposite of torchtune's
    ``kd_ratio``); the CE term is skipped entirely at alpha = 0 and the KD term at alpha = 1 (the
    teacher may then be None). CE always uses the student's full vocabulary; ``vocab_size`` only
    cuts the KD term.

    ``teacher_logits`` is dense ``[B, T, V']`` logits (KD by :func:`kd_loss_sum`) or a stored
    :class:`TopK` of the answer rows (KD by :func:`sparse_kd_loss_sum`, over the first
    ``vocab_size`` rows, all of the student's when None: set it to the width the TopK was built with).
    """
    if loss not in LOSS_NAMES:
        raise ValueError(f"unknown loss {loss!r}; expected one of: {', '.join(LOSS_NAMES)}")
    if loss == "sft":
        ce = cross_entropy_sum(student_logits, targets)
        return LossTerms(ce, ce=ce)
    problems = _kd_problems(loss, temperature, beta, lam, chunk_size, vocab_size)
    if not 0.0 <= alpha <= 1.0:
        problems.append(f"alpha must be in [0, 1], got {alpha}")
    if teacher_logits is None and alpha < 1.0:
        problems.append(f"loss {loss!r} with alpha {alpha} needs teacher_logits")
    _raise_if(problems)

    ce = cross_entropy_sum(student_logits, targets) if alpha > 0.0 else None
    kd = None
    if alpha < 1.0:
        kd_sum = sparse_kd_loss_sum if isinstance(teacher_logits, TopK) else kd_loss_sum
        kd = kd_sum(student_logits, teacher_logits, targets, divergence=loss, temperature=temperature, beta=beta,
                    lam=lam, chunk_size=chunk_size, vocab_size=vocab_size)
    if kd is None:
        total = alpha * ce
    elif ce is None:
        total = (1.0 - alpha) * kd
    else:
        total = alpha * ce + (1.0 - alpha) * kd
    return LossTerms(total, ce=ce, kd=kd)
