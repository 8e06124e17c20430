"""Difficulty scores for a run's training set, as ``curriculum.difficulty`` asks.

Scorers that need a model (``student_loss``, ``teacher_loss``, or ``rrf`` over them) get it
lazily from the caller, so ``clpd plan`` can show everything else offline and mark those scores
as computed at train time.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np

from clpd.config import CurriculumConfig, Difficulty, Order, Pacing
from clpd.curriculum import difficulty as d
from clpd.data import Problem

MODEL_SCORERS = {Difficulty.student_loss, Difficulty.teacher_loss}


def scorers(c: CurriculumConfig) -> list:
    return list(c.rrf_scorers) if c.difficulty == Difficulty.rrf else [c.difficulty]


def needs_model(c: CurriculumConfig) -> bool:
    return any(s in MODEL_SCORERS for s in scorers(c))


def is_curriculum(c: CurriculumConfig) -> bool:
    """Whether the order or the pool depends on difficulty (random order, no pacing: it does not)."""
    return c.order != Order.random or c.pacing != Pacing.none


def compute_scores(c: CurriculumConfig, problems: Sequence[Problem], examples: Optional[Sequence[dict]], seed: int,
                   model_scores: Optional[Dict[Difficulty, Callable[[], np.ndarray]]] = None) -> np.ndarray:
    """Difficulty per example, higher = harder. ``model_scores`` maps the model scorers to
    functions that compute them (one batched pass each)."""
    def one(name: Difficulty) -> np.ndarray:
        if name == Difficulty.cot_steps:
            return d.cot_steps(problems)
        if name == Difficulty.cot_length:
            return d.cot_length(examples)
        if name == Difficulty.random:
            return d.random_scores(len(problems), seed)
        return model_scores[name]()

    arrays = [one(s) for s in scorers(c)]
    return d.rrf(arrays) if c.difficulty == Difficulty.rrf else arrays[0]
