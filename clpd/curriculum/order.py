"""The training order: the example indices from easy to hard (or the reverse, or random)."""

from __future__ import annotations

from typing import Any, List, Sequence

import numpy as np

ORDERS = ("easy_to_hard", "hard_to_easy", "random")


def order_indices(scores: Sequence[float], order: Any, seed: int) -> List[int]:
    """The example indices in training order.

    ``easy_to_hard``: ascending difficulty; ``hard_to_easy``: descending; ``random``: a seeded
    permutation that ignores the scores. Ties are broken by a random key drawn from ``seed``
    (``np.lexsort`` by (key, score)), so the same seed gives the same order and another seed may
    order tied examples differently; a curriculum over a coarse scorer is not ordered by index.
    """
    key = getattr(order, "value", order)  # the config's str Enum or a plain string
    if key not in ORDERS:
        raise ValueError(f"unknown order {key!r}; allowed: {', '.join(ORDERS)}")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    rng = np.random.default_rng(seed)
    if key == "random":
        return rng.permutation(len(s)).tolist()
    if np.isnan(s).any():
        raise ValueError(f"scores hold NaN at positions {np.flatnonzero(np.isnan(s))[:10].tolist()}")
    tie_break = rng.random(len(s))
    primary = s if key == "easy_to_hard" else -s
    return np.lexsort((tie_break, primary)).tolist()  # the last key is the primary one
