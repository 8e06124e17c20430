"""``distill_loss``: what the training step calls: ``alpha * CE + (1 - alpha) * KD`` (or plain CE
for ``"sft"``), with its two terms apart (:class:`LossTerms`) so that both can be logged."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from clpd.losses.chunks import _kd_problems, _raise_if, cross_entropy_sum
from clpd.losses.dense import kd_loss_sum
from clpd.losses.divergences import LOSS_NAMES
from clpd.losses.fused import HeadRows, fused_loss_terms
from clpd.losses.sparse import TopK, sparse_kd_loss_sum


class LossTerms(NamedTuple):
    """A loss summed over answer tokens, and its two terms unweighted (None where not computed):
    ``total = alpha * ce + (1 - alpha) * kd``."""
    total: torch.Tensor
    ce: Optional[torch.Tensor] = None
    kd: Optional[torch.Tensor] = None



def distill_loss(student_logits: Union[torch.Tensor, HeadRows], teacher_logits: Optional[Union[torch.Tensor, TopK, HeadRows]],
                 targets: torch.Tensor, *,
                 loss: str, alpha: float, temperature: float = 1.0, beta: float = 0.5, lam: float = 0.1,
                 chunk_size: int = 256, vocab_size: Optional[int] = None, gold: bool = True,
                 slice_size: Optional[int] = None) -> LossTerms:
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

    ``student_logits`` may be the student's :class:`HeadRows` (answer rows' hidden states and output
    matrix, ``targets`` then [N]; the teacher's may be too): the same loss, fused with the output
    layer, with no [N, V] logits held (:mod:`clpd.losses.fused`); ``slice_size`` then cuts each row
    chunk into slices of that many vocabulary rows (:mod:`clpd.losses.vocab_slices`).

    ``gold=False``: ``targets`` are the student's own sampled tokens (on-policy), on which no
    cross-entropy is taken: the total is ``(1 - alpha) * KD`` alone, the same divergence code fed
    other targets, weighed as it is on gold tokens.
    """
    if loss not in LOSS_NAMES:
        raise ValueError(f"unknown loss {loss!r}; expected one of: {', '.join(LOSS_NAMES)}")
    fused = isinstance(student_logits, HeadRows)
    if loss == "sft":
        if fused:
            total, _, _ = fused_loss_terms(student_logits, None, targets, loss=loss, alpha=1.0, chunk_size=chunk_size,
                                           slice_size=slice_size)
            return LossTerms(total, ce=total)
        ce = cross_entropy_sum(student_logits, targets)
        return LossTerms(ce, ce=ce)
    problems = _kd_problems(loss, temperature, beta, lam, chunk_size, vocab_size)
    if not 0.0 <= alpha <= 1.0:
        problems.append(f"alpha must be in [0, 1], got {alpha}")
    if not gold and alpha >= 1.0:
        problems.append(f"sampled targets (gold=False) take the KD term only, which alpha {alpha} leaves out")
    if teacher_logits is None and alpha < 1.0:
        problems.append(f"loss {loss!r} with alpha {alpha} needs teacher_logits")
    _raise_if(problems)

    if fused:
        total, ce, kd = fused_loss_terms(student_logits, teacher_logits, targets, loss=loss, alpha=alpha,
                                         temperature=temperature, beta=beta, lam=lam, chunk_size=chunk_size,
                                         vocab_size=vocab_size, gold=gold, slice_size=slice_size)
        return LossTerms(total, ce=ce, kd=kd)
    ce = cross_entropy_sum(student_logits, targets) if alpha > 0.0 and gold else None
    kd = None
    if alpha < 1.0:
        kd_sum = sparse_kd_loss_sum if isinstance(teacher_logits, TopK) else kd_loss_sum
        kd = kd_sum(student_logits, teacher_logits, targets, divergence=loss, temperature=temperature, beta=beta,
                    lam=lam, chunk_size=chunk_size, vocab_size=vocab_size)
    if not gold:
        total = (1.0 - alpha) * kd
    elif kd is None:
        total = alpha * ce
    elif ce is None:
        total = (1.0 - alpha) * kd
    else:
        total = alpha * ce + (1.0 - alpha) * kd
    return LossTerms(total, ce=ce, kd=kd)
