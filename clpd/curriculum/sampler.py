"""The batch sampler. It owns the order of the training data: nothing else shuffles."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np


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
        n = self.pool(step)
        info: Dict = {"pool": n}
        if self._low is not None:
            info["difficulty"] = [round(float(self._low[n - 1]), 4), round(float(self._high[n - 1]), 4)]
        return info
