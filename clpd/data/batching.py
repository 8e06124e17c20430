"""Batching of encoded examples, shared by the training loop and the loss-based difficulty scorers.

Two layouts of the same micro-batch. ``collate`` right-pads the examples into rows; ``pack``
concatenates them into one row without padding, with position ids restarting at each example, from
which transformers keeps attention inside each example (its masks for sdpa/eager, cu_seqlens for
flash-attention). Both score the same (token, next token)
pairs, so a step's loss is the same in either layout up to float rounding.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from clpd.data.records import IGNORE_INDEX


def collate(examples: Sequence[dict], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples and shift once: the model reads ``input_ids`` and is
    scored on ``targets`` (the next token, -100 where no loss is taken).

    No attention mask: in a causal model a real token attends only to the positions before it, and
    with padding on the right those are all real, so a mask would change only the outputs at
    padding, which no loss reads. Without one, sdpa runs its causal kernel instead of building
    and applying a [rows, 1, T, T] mask."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
    return {"input_ids": ids[:, :-1], "targets": labels[:, 1:]}


def pack(examples: Sequence[dict]) -> Dict[str, torch.Tensor]:
    """The examples in one row of ``sum(len - 1)`` positions: each shifted on its own (its last token
    only ends it), ``position_ids`` restarting at 0 for each, no padding and no attention mask."""
    ids, targets, positions = [], [], []
    for e in examples:
        n = len(e["input_ids"])
        ids += e["input_ids"][:-1]
        targets += e["labels"][1:]
        positions += range(n - 1)
    as_row = lambda values: torch.tensor(values, dtype=torch.long).unsqueeze(0)  # noqa: E731
    return {"input_ids": as_row(ids), "position_ids": as_row(positions), "targets": as_row(targets)}


def answer_mask(targets: torch.Tensor) -> torch.Tensor:
    """The positions a loss is taken on, as transformers' ``logits_to_keep`` takes them: a boolean
    [rows, positions] mask, for which the model applies its output layer to those positions only and
    returns their logits flattened to [answer positions, vocabulary], in row-major order (the order
    ``targets[mask]`` and the stored teacher outputs list them in)."""
    return targets != IGNORE_INDEX


def prompt_length(example: dict) -> int:
    """The tokens of an encoded example before its answer (its leading -100 labels)."""
    labels = example["labels"]
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def with_answer(example: dict, answer: Sequence[int]) -> dict:
    """``example``'s prompt followed by another ``answer`` (a sample's token ids), encoded like it:
    the loss is taken on the answer's tokens only."""
    n = prompt_length(example)
    return {**example, "input_ids": [*example["input_ids"][:n], *answer], "labels": [IGNORE_INDEX] * n + list(answer)}


def read_token_count(examples: Sequence[dict]) -> int:
    """The tokens the student reads that predict a next token: ``len - 1`` per example, in either
    layout (padding, and the last token of an example, predict nothing)."""
    return sum(len(e["input_ids"]) - 1 for e in examples)


def answer_token_count(examples: Sequence[dict]) -> int:
    """The targets a micro-batch takes a loss on (labels after the first that are not -100)."""
    return sum(sum(1 for t in e["labels"][1:] if t != IGNORE_INDEX) for e in examples)


def position_count(examples: Sequence[dict], packed: bool) -> int:
    """The positions the model computes for ``examples`` as one micro-batch: with padding, rows x
    the longest example; packed, the tokens themselves."""
    if packed:
        return read_token_count(examples)
    return len(examples) * (max(len(e["input_ids"]) for e in examples) - 1)


def cut_by_tokens(batch: Sequence[dict], budget: int, packed: bool) -> List[List[dict]]:
    """``batch`` (sorted by length) cut, in order, into micro-batches of at most ``budget``
    positions each (see :func:`position_count`); an example longer than the budget is refused
    before training (clpd.commands.run_train checks the encoded data)."""
    chunks: List[List[dict]] = []
    for e in batch:
        if chunks and position_count([*chunks[-1], e], packed) <= budget:
            chunks[-1].append(e)
        else:
            chunks.append([e])
    return chunks


def packing_is_exact(model: torch.nn.Module) -> bool:
    """Whether ``model`` keeps packed examples apart: two short sequences packed in one row (position
    ids restarting) give the logits they give alone. transformers does so for its own attention
    implementations (a block-diagonal mask for sdpa/eager, cu_seqlens for flash-attention); code
    loaded with trust_remote_code may not. Deterministic inputs, eval mode, no RNG drawn."""
    vocab = model.get_input_embeddings().num_embeddings
    sequences = [[(7 * i + 3) % vocab for i in range(5)], [(5 * i + 11) % vocab for i in range(7)]]
    device = next(model.parameters()).device
    row = lambda values: torch.tensor([values], dtype=torch.long, device=device)  # noqa: E731
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            alone = torch.cat([model(input_ids=row(s), use_cache=False).logits[0] for s in sequences]).float()
            packed = model(input_ids=row(sum(sequences, [])), position_ids=row([p for s in sequences for p in range(len(s))]),
                           use_cache=False).logits[0].float()
    finally:
        model.train(was_training)
    return torch.allclose(packed, alone, rtol=1e-3, atol=1e-4)
