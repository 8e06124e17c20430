"""Difficulty scorers, their fusion, and which of them a run's config uses.

Every scorer returns a numpy float array with one score per problem, in the problems' order;
HIGHER means HARDER. :func:`compute_scores` applies the config's ``curriculum.difficulty``
(``rrf`` fuses several scorers). Scorers that need a model (``student_loss``, ``teacher_loss``:
:func:`per_example_loss`) get it lazily from the caller, so ``clpd plan`` can show everything
else offline and mark those scores as computed at train time; their scores are worth caching
(:mod:`clpd.curriculum.score_cache`), the others are cheap to recompute.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clpd.config.schema import CurriculumConfig
from clpd.config.enums import Difficulty, Order, Pacing
from clpd.data.batching import answer_mask, answer_token_count, collate, pack
from clpd.data.records import IGNORE_INDEX
from clpd.data.records import Problem


# --- scorers -----------------------------------------------------------------------------------

def cot_steps(problems: Sequence[Problem]) -> np.ndarray:
    """The number of reasoning steps of each problem's solution (``Problem.num_steps``)."""
    return np.array([p.num_steps for p in problems], dtype=np.float64)


def cot_length(examples: Sequence[Dict[str, Any]]) -> np.ndarray:
    """The number of answer tokens of each encoded example: its labels that are not -100 (the
    solution and the eos, after any truncation)."""
    return np.array([sum(1 for t in e["labels"] if t != IGNORE_INDEX) for e in examples], dtype=np.float64)


def random_scores(n: int, seed: int) -> np.ndarray:
    """The control: ``n`` scores uniform in [0, 1), the same for the same seed."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    return np.random.default_rng(seed).random(n)


def per_example_loss(model: torch.nn.Module, examples: Sequence[Dict[str, Any]], *, batch_size: int,
                     device: torch.device | str, pad_id: int, packed: bool = False) -> np.ndarray:
    """The mean cross-entropy of each example's answer tokens under ``model`` (a transformers
    causal LM already on ``device``): the ``student_loss`` scorer with the initial student, the
    ``teacher_loss`` scorer with a teacher.

    One pass over the examples in batches of ``batch_size``, longest first (similar lengths share
    a batch, so little padding; an out-of-memory error shows on the first batch), in the training
    loop's layout: right-padded rows (``clpd.data.batching.collate``), or with ``packed`` one padding-free row
    (``clpd.data.batching.pack``), in eval mode under ``torch.inference_mode()``. The model's
    train/eval mode is restored afterwards. The output layer runs on answer positions only
    (``logits_to_keep``), and their logits are upcast to fp32 one example at a time. An example with
    no answer token (a prompt cut by ``max_len``) scores 0.0: it contributes no loss to training
    either. Returned in the order of ``examples``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    n = len(examples)
    losses = np.zeros(n, dtype=np.float64)
    by_length = sorted(range(n), key=lambda i: -len(examples[i]["input_ids"]))  # stable: ties keep input order
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                rows = by_length[start:start + batch_size]
                part = [examples[i] for i in rows]
                batch = {k: v.to(device) for k, v in (pack(part) if packed else collate(part, pad_id)).items()}
                targets = batch.pop("targets")  # position j predicts token j + 1
                keep = answer_mask(targets)
                logits = model(**batch, logits_to_keep=keep, use_cache=False).logits  # [answer positions, V]
                # Answer positions come example by example (row-major), in each example's order.
                counts = [answer_token_count([e]) for e in part]
                for i, count, x, y in zip(rows, counts, logits.split(counts), targets[keep].split(counts)):
                    if count:
                        losses[i] = F.cross_entropy(x.float(), y, reduction="sum").item() / count
                del logits
    finally:
        model.train(was_training)
    return losses


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """Ranks 1..n in ascending score; tied scores share the average of the ranks they span
    (``scipy.stats.rankdata(method="average")``)."""
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))  # 0-based position of each value's first rank
    return (first + (counts + 1) / 2.0)[inverse]


def rrf(score_arrays: Sequence[np.ndarray], k: float = 60.0) -> np.ndarray:
    """Reciprocal rank fusion (Cormack, Clarke & Buettcher 2009, SIGIR), as POCL fuses difficulty
    scorers: each scorer ranks the examples from easy (rank 1) to hard, the fused *easiness* of an
    example is ``sum over scorers of 1 / (k + rank)``, and the returned difficulty is its negative
    (higher = harder, like every scorer here).

    Ties within a scorer share the average of the ranks they span (fractional ranking): examples
    a scorer cannot tell apart get the same rank, and the scorer's ranks still sum to
    n (n + 1) / 2, so a coarse scorer (``cot_steps`` has a handful of values) does not pull its
    examples towards "easy" as the minimum rank would.
    """
    if len(score_arrays) == 0:
        raise ValueError("rrf needs at least one score array")
    if not k >= 0:
        raise ValueError(f"k={k} must be >= 0")
    arrays = [np.asarray(a, dtype=np.float64) for a in score_arrays]
    n = len(arrays[0])
    for j, a in enumerate(arrays):
        if a.ndim != 1 or len(a) != n:
            raise ValueError(f"score array {j} has shape {a.shape}; all must be 1-D of length {n}")
        if np.isnan(a).any():
            raise ValueError(f"score array {j} holds NaN at positions {np.flatnonzero(np.isnan(a))[:10].tolist()}")
    easiness = sum(1.0 / (k + _average_ranks(a)) for a in arrays)
    return -np.asarray(easiness, dtype=np.float64)


# --- the config's scorers ------------------------------------------------------------------

MODEL_SCORERS = {Difficulty.student_loss, Difficulty.teacher_loss, Difficulty.teacher_cot_steps}
TEACHER_SCORERS = {Difficulty.teacher_loss, Difficulty.teacher_cot_steps}  # need curriculum.teacher


def scorers(c: CurriculumConfig) -> list:
    return list(c.rrf_scorers) if c.difficulty == Difficulty.rrf else [c.difficulty]


def given_difficulty(problems: Sequence[Problem]) -> Optional[np.ndarray]:
    """The difficulty the data gives every problem (``Problem.difficulty``), or None."""
    if not problems or any(p.difficulty is None for p in problems):
        return None
    return np.array([p.difficulty for p in problems], dtype=np.float64)


def needs_model(c: CurriculumConfig) -> bool:
    return any(s in MODEL_SCORERS for s in scorers(c))


def is_curriculum(c: CurriculumConfig) -> bool:
    """Whether the order or the pool depends on difficulty (random order, no pacing: it does not)."""
    return c.order != Order.random or c.pacing != Pacing.none


def compute_scores(c: CurriculumConfig, problems: Sequence[Problem], examples: Optional[Sequence[dict]], seed: int,
                   model_scores: Optional[Dict[Difficulty, Callable[[], np.ndarray]]] = None) -> np.ndarray:
    """Difficulty per example, higher = harder. ``model_scores`` maps the model scorers to
    functions that compute them (one batched pass each). Problems whose data gives a difficulty (a
    file benchmark's difficulty field) are ordered by it, whatever scorer the config names."""
    given = given_difficulty(problems)
    if given is not None:
        return given
    def one(name: Difficulty) -> np.ndarray:
        if name == Difficulty.cot_steps:
            return cot_steps(problems)
        if name == Difficulty.cot_length:
            return cot_length(examples)
        if name == Difficulty.random:
            return random_scores(len(problems), seed)
        return model_scores[name]()

    arrays = [one(s) for s in scorers(c)]
    return rrf(arrays) if c.difficulty == Difficulty.rrf else arrays[0]
