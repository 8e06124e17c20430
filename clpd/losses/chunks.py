"""What the dense and the sparse KD losses share: cross-entropy and answer rows, the checks of their
arguments, and the chunk runner that keeps the memory of a [rows, V] loss bounded."""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from clpd.data.records import IGNORE_INDEX
from clpd.losses.divergences import DIVERGENCES


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
# splitting small ones costs kernel launches, for a few MiB saved (python -m clpd.bench.store step,
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
