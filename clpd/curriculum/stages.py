"""Stages: the one source of truth that aligns the data curriculum with the teacher schedule.

K stages (``curriculum.num_stages``, default one per teacher). With a pacing function, stage k
(0-based) begins at the first step at which the available pool reaches the k-th difficulty band,
i.e. ceil(k/K * n) of the n ordered examples: the strong teachers arrive with the hard data.
Without pacing, stages split training evenly or follow the explicit boundaries.
"""

from __future__ import annotations

import math
from typing import List, Sequence

from clpd.config.enums import Pacing
from clpd.config.schema import TrainConfig
from clpd.curriculum.sampler import pool_function


def even_boundaries(num_stages: int) -> List[float]:
    return [k / num_stages for k in range(1, num_stages)]


def stage_starts(tc: TrainConfig, n: int) -> List[int]:
    """First optimizer step of stages 1..K-1 (stage 0 begins at step 0)."""
    stages, max_steps = tc.num_stages(), tc.trainer.max_steps
    if tc.curriculum.pacing != Pacing.none:
        pool = pool_function(tc, n)
        starts = []
        for k in range(1, stages):
            need = math.ceil(k / stages * n)
            starts.append(next((s for s in range(max_steps) if pool(s) >= need), max_steps))
        return starts
    fractions = tc.curriculum.stage_boundaries or tc.teachers.boundaries or even_boundaries(stages)
    return [round(f * max_steps) for f in fractions]


def stage_at(step: int, starts: Sequence[int]) -> int:
    return sum(step >= s for s in starts)
