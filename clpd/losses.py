"""Token-level training losses as pure functions of logits and targets.

Targets are already shifted (``targets[:, t]`` is the token after position t) and hold -100 where
no loss is taken (prompt and padding). Each function returns the *sum* over answer tokens: the
training loop divides by the answer tokens of the whole accumulated batch, so every answer token
weighs the same however the batch was split into micro-batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the gold tokens, in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
