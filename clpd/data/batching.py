"""Batching of encoded examples, shared by the training loop and the loss-based difficulty scorers."""

from __future__ import annotations

from typing import Dict, Sequence

import torch

from clpd.losses import IGNORE_INDEX


def collate(examples: Sequence[dict], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples and shift once: the model reads ``input_ids`` and is
    scored on ``targets`` (the next token, -100 where no loss is taken)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1], "targets": labels[:, 1:]}


def read_token_count(examples: Sequence[dict]) -> int:
    """The non-padding positions ``collate(examples)`` feeds the model (its attention mask's sum),
    without building it: the shift drops the last column, so the longest example reads one fewer."""
    width = max(len(e["input_ids"]) for e in examples)
    return sum(min(len(e["input_ids"]), width - 1) for e in examples)


def answer_token_count(examples: Sequence[dict]) -> int:
    """The targets ``collate(examples)`` takes a loss on (labels after the first that are not -100)."""
    return sum(sum(1 for t in e["labels"][1:] if t != IGNORE_INDEX) for e in examples)
