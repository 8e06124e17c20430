"""Stages: the one source of truth that aligns the data curriculum with the teacher schedule.

K stages (``curriculum.num_stages``, default one per teacher). With a pacing function, where stage k
(0-based) begins is ``curriculum.stage_placement``:

- ``pool`` (default): at the first step at which the available pool reaches ceil(k/K * n) of the
  n ordered examples, so every stage adds as many examples and the strong teachers arrive with the
  hard data. Under a concave pacing (root) the early stages are short: the pool grows fastest at
  the start.
- ``steps``: at k/K of the steps (or the explicit boundaries), whatever the pool holds then.
- ``band``: the distinct difficulty levels along the order are split into K contiguous bands (as
  equal in levels as can be; the last band takes what is left over) and stage k begins at the first
  step at which the pool holds a problem of band k: with as many levels as teachers, the stage that
  first adds level-k problems gets teacher k.

Without pacing, stages split training evenly or follow the explicit boundaries.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np

from clpd.config.enums import Pacing, StagePlacement
from clpd.config.schema import TrainConfig
from clpd.curriculum.sampler import Sampler
from clpd.errors import ClpdError


def even_boundaries(num_stages: int) -> List[float]:
    return [k / num_stages for k in range(1, num_stages)]


def stage_starts(tc: TrainConfig, sampler: Sampler) -> List[int]:
    """First optimizer step of stages 1..K-1 (stage 0 begins at step 0) for the run's sampler."""
    c, stages, max_steps = tc.curriculum, tc.num_stages(), tc.trainer.max_steps
    if c.pacing == Pacing.none or c.stage_placement == StagePlacement.steps:
        fractions = c.stage_boundaries or tc.teachers.boundaries or even_boundaries(stages)
        return [round(f * max_steps) for f in fractions]
    if c.stage_placement == StagePlacement.band:
        needs = band_pool_sizes(sampler.ordered_scores, stages)
    else:
        needs = [math.ceil(k / stages * len(sampler.order)) for k in range(1, stages)]
    return [next((s for s in range(max_steps) if sampler.pool(s) >= need), max_steps) for need in needs]


def band_pool_sizes(ordered: Optional[np.ndarray], stages: int) -> List[int]:
    """The pool sizes at which bands 1..K-1 begin: the distinct levels of ``ordered`` (difficulty
    along the curriculum's order, monotone) in K contiguous bands, band k from level floor(k*L/K)."""
    if ordered is None:
        raise ClpdError("curriculum.stage_placement=band needs difficulty scores; allowed without them: pool, steps")
    firsts = np.concatenate([[0], np.flatnonzero(np.diff(ordered) != 0) + 1])  # where each level begins
    if len(firsts) < stages:
        raise ClpdError(f"curriculum.stage_placement=band: the difficulty has {len(firsts)} levels for {stages} stages; "
                        f"allowed: at least as many levels as stages (or stage_placement=pool or steps)")
    return [int(firsts[k * len(firsts) // stages]) + 1 for k in range(1, stages)]


def stage_at(step: int, starts: Sequence[int]) -> int:
    return sum(step >= s for s in starts)
