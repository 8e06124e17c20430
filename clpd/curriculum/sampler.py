"""The batch sampler. It owns the order of the training data: nothing else shuffles.

:func:`build_sampler` makes a run's sampler from its config: the examples ordered by difficulty
(:mod:`clpd.curriculum.order`) and paced by ``curriculum.pacing`` (:func:`pool_function`).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from clpd.config.schema import TrainConfig
from clpd.curriculum.order import order_indices
from clpd.curriculum.pacing import pool_size


def full_pool(n: int) -> Callable[[int], int]:
    """Pacing without a curriculum: all ``n`` examples are available at every step."""
    return lambda step: n


class Sampler:
    """Each step's batch is drawn uniformly, without replacement, from the first ``pool_size(step)``
    entries of ``order`` (the difficulty-ordered example indices).

    The draw for step ``s`` depends only on (seed, s), so any step's batch can be reproduced without
    replaying the steps before it (resume), and two runs with the same seed see the same batches.
    With ``scores`` (difficulty per example), :meth:`describe` reports the pool's difficulty range.
    """

    def __init__(self, order: Sequence[int], batch_size: int, seed: int,
                 pool_size: Callable[[int], int] | None = None, scores: Optional[Sequence[float]] = None) -> None:
        if len(order) == 0:
            raise ValueError("the sampler needs at least one training example")
        self.order = np.asarray(order)
        self.batch_size = batch_size
        self.seed = seed
        self.pool_size = pool_size or full_pool(len(order))
        # Running min/max of the difficulty along the order: the range of any pool in O(1).
        ordered = None if scores is None else np.asarray(scores, dtype=np.float64)[self.order]
        self.ordered_scores = ordered  # the difficulty along the order (None without scores)
        self._low = None if ordered is None else np.minimum.accumulate(ordered)
        self._high = None if ordered is None else np.maximum.accumulate(ordered)

    def pool(self, step: int) -> int:
        return max(1, min(self.pool_size(step), len(self.order)))

    def batch(self, step: int, at: Optional[int] = None) -> List[int]:
        """The batch of optimizer step ``step``, drawn from the pool of schedule step ``at``
        (default ``step``; they differ under a token budget, see ``trainer.max_tokens``)."""
        n = self.pool(step if at is None else at)
        rng = np.random.default_rng([self.seed, step])
        # With fewer examples than the batch size, examples repeat within the batch.
        picks = rng.choice(n, size=self.batch_size, replace=n < self.batch_size)
        return self.order[picks].tolist()

    def describe(self, step: int) -> Dict:
        """For the log and the plan: ``{"pool": n}``, and with scores ``"difficulty": [min, max]``
        of the first n examples of the order (rounded to 4 decimals)."""
        n = self.pool(step)
        info: Dict = {"pool": n}
        if self._low is not None:
            info["difficulty"] = [round(float(self._low[n - 1]), 4), round(float(self._high[n - 1]), 4)]
        return info


def pool_function(tc: TrainConfig, n: int) -> Callable[[int], int]:
    """Examples available at each optimizer step under ``curriculum.pacing``."""
    c = tc.curriculum
    return lambda step: pool_size(c.pacing.value, step, tc.trainer.max_steps, n, start=c.start,
                                  saturate=c.saturate, root_p=c.root_p, num_buckets=c.num_buckets)


def build_sampler(tc: TrainConfig, scores: Optional[np.ndarray], n: int) -> Sampler:
    """The run's sampler: ``n`` examples ordered by ``scores`` (None: no scores, random order
    only) and paced by ``curriculum.pacing``. ``clpd train`` and ``clpd plan`` both build it here,
    which is why a plan matches its run step by step."""
    order = order_indices(scores if scores is not None else np.zeros(n), tc.curriculum.order, tc.seed)
    return Sampler(order, tc.trainer.batch_size, seed=tc.seed, pool_size=pool_function(tc, n), scores=scores)
