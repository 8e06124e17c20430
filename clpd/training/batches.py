"""The batches of a run: the sampler's batch of each optimizer step, cut into micro-batches in the
run's layout (padded rows or packed, ``grad_accum`` equal ones or at most ``micro_batch_tokens``),
and this rank's share of each under torchrun."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from clpd.curriculum.sampler import Sampler
from clpd.data.batching import answer_token_count, collate, cut_by_tokens, pack, position_count, read_token_count
from clpd.training.distributed import ranks


@dataclass
class StepBatch:
    examples: List[dict]  # the step's whole batch (every rank's), sorted by length
    micro_batches: List[Dict[str, torch.Tensor]]  # this rank's share of each micro-batch, in its layout
    tokens: int  # tokens the student reads that predict a next token, over all ranks
    positions: int  # positions the models compute, padding included, over all ranks
    answer_tokens: int  # targets the loss is taken on, over all ranks: what the loss is divided by



@dataclass
class Batches:
    """The training examples, the sampler that owns their order, and the layout of micro-batches:
    padded rows or packed (``packed``), ``grad_accum`` equal ones or at most ``micro_batch_tokens``
    positions each. The layout never changes which examples a step sees."""
    examples: Sequence[dict]
    sampler: Sampler
    pad_id: int
    packed: bool = False
    micro_batch_tokens: Optional[int] = None

    def step(self, step: int, at: int, micro_size: int) -> StepBatch:
        """The batch of optimizer step ``step`` (pool of schedule step ``at``) as micro-batches.

        Sorting the step's batch by length before cutting it only changes how much padding each
        micro-batch carries, not the update: the loss is normalised by the whole step's answer
        tokens. Under torchrun rank r takes examples r, r + N, ... of every micro-batch, so the
        ranks together see exactly the single-process batch, in lengths that are about equal."""
        order = sorted(self.sampler.batch(step, at), key=lambda i: len(self.examples[i]["input_ids"]))
        batch = [self.examples[i] for i in order]
        chunks = (cut_by_tokens(batch, self.micro_batch_tokens, self.packed) if self.micro_batch_tokens
                  else [batch[i:i + micro_size] for i in range(0, len(batch), micro_size)])
        starts = np.cumsum([0, *map(len, chunks)])
        r = ranks()
        layout = pack if self.packed else functools.partial(collate, pad_id=self.pad_id)
        # Each micro-batch also says which examples it holds ("index"): stored teacher outputs are found by example.
        mine = [{**layout(chunk[r.rank::r.world_size]),
                 "index": torch.tensor(order[a:b][r.rank::r.world_size], dtype=torch.long)}
                for chunk, a, b in zip(chunks, starts, starts[1:])]
        positions = sum(position_count(chunk[q::r.world_size], self.packed) for chunk in chunks for q in range(r.world_size))
        return StepBatch(batch, mine, read_token_count(batch), positions, answer_token_count(batch))
