"""The batches of a run: the sampler's batch of each optimizer step, cut into micro-batches in the
run's layout (padded rows or packed, ``grad_accum`` equal ones or at most ``micro_batch_tokens``),
and this rank's share of each under torchrun."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from clpd.curriculum.sampler import Sampler
from clpd.data.batching import answer_token_count, collate, cut_by_tokens, pack, position_count, read_token_count
from clpd.training.distributed import all_reduce_sum, ranks
from clpd.training.targets import TeacherTargets


@dataclass
class StepBatch:
    examples: List[dict]  # the step's whole batch (every rank's), sorted by length
    micro_batches: List[Dict[str, torch.Tensor]]  # this rank's share of each micro-batch, in its layout
    tokens: int  # tokens the student reads that predict a next token, over all ranks
    positions: int  # positions the models compute, padding included, over all ranks
    answer_tokens: int  # targets the loss is taken on, over all ranks: what the loss is divided by
    # On-policy (distill.on_policy): the examples this rank's student answers itself, and once it has
    # (Batches.answered), their micro-batches; the counts above then include them.
    to_answer: List[dict] = field(default_factory=list)
    sampled: List[Dict[str, torch.Tensor]] = field(default_factory=list)
    sampled_tokens: int = 0  # answer tokens of the samples, over all ranks (part of answer_tokens)
    left_out: int = 0  # drawn examples without a kept teacher solution (distill.targets=teacher, keep=correct)



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
    # (step, n) -> which of a step's n examples (sorted by length) the student answers itself; None: all gold
    choose: Optional[Callable[[int, int], np.ndarray]] = None
    targets: Optional[TeacherTargets] = None  # sequence-level KD: the teachers' solutions in place of the gold ones

    def step(self, step: int, at: int, micro_size: int) -> StepBatch:
        """The batch of optimizer step ``step`` (pool of schedule step ``at``) as micro-batches.

        Sorting the step's batch by length before cutting it only changes how much padding each
        micro-batch carries, not the update: the loss is normalised by the whole step's answer
        tokens. Under torchrun rank r takes examples r, r + N, ... of every micro-batch, so the
        ranks together see exactly the single-process batch, in lengths that are about equal."""
        drawn = self.sampler.batch(step, at)
        rows = {i: i for i in drawn}  # where stored teacher outputs are found: the example, or its written solution
        if self.targets is None:
            chosen_examples = {i: self.examples[i] for i in drawn}
        else:  # an example the step's teacher wrote no kept solution for is left out
            written = {i: self.targets.written(self.examples, i, step, at) for i in drawn}
            chosen_examples = {i: w[0] for i, w in written.items() if w is not None}
            rows = {i: w[1] for i, w in written.items() if w is not None}
        order = sorted((i for i in drawn if i in chosen_examples), key=lambda i: len(chosen_examples[i]["input_ids"]))
        everything = [chosen_examples[i] for i in order]
        answered = []
        if self.choose is not None:  # the student's share: taken out of the gold micro-batches
            chosen = self.choose(step, len(order))
            answered = [i for i, c in zip(order, chosen) if c]
            order = [i for i, c in zip(order, chosen) if not c]
        batch = [chosen_examples[i] for i in order]
        mine, positions = self._micro_batches(batch, [rows[i] for i in order], micro_size)
        r = ranks()
        return StepBatch(everything, mine, read_token_count(batch), positions, answer_token_count(batch),
                         to_answer=[chosen_examples[i] for i in answered[r.rank::r.world_size]],
                         left_out=len(drawn) - len(everything))

    def answered(self, batch: StepBatch, samples: List[dict], micro_size: int) -> StepBatch:
        """``batch`` with this rank's ``samples`` (its ``to_answer`` examples with the student's own
        answers) as micro-batches of their own, after the gold ones, and the counts over all ranks."""
        samples = sorted(samples, key=lambda e: len(e["input_ids"]))
        mine, positions = self._micro_batches(samples, [-1] * len(samples), micro_size, split=False)
        counts = all_reduce_sum(torch.tensor([read_token_count(samples), positions, answer_token_count(samples)],
                                             dtype=torch.float64)).tolist()
        tokens, positions, answers = (int(x) for x in counts)
        return replace(batch, sampled=mine, tokens=batch.tokens + tokens, positions=batch.positions + positions,
                       answer_tokens=batch.answer_tokens + answers, sampled_tokens=answers)

    def _micro_batches(self, batch: List[dict], order: List[int], micro_size: int,
                       split: bool = True) -> tuple[List[Dict[str, torch.Tensor]], int]:
        """``batch`` cut into micro-batches in the run's layout, this rank's share of each (all of
        them when not ``split``: a rank's own samples), and the positions they compute over all ranks."""
        chunks = (cut_by_tokens(batch, self.micro_batch_tokens, self.packed) if self.micro_batch_tokens
                  else [batch[i:i + micro_size] for i in range(0, len(batch), micro_size)])
        starts = np.cumsum([0, *map(len, chunks)])
        r = ranks()
        rank, world = (r.rank, r.world_size) if split else (0, 1)
        layout = pack if self.packed else functools.partial(collate, pad_id=self.pad_id)
        # Each micro-batch also says which examples it holds ("index", ``order``): stored teacher outputs are
        # found by example (or by written solution).
        mine = [{**layout(chunk[rank::world]), "index": torch.tensor(order[a:b][rank::world], dtype=torch.long)}
                for chunk, a, b in zip(chunks, starts, starts[1:])]
        positions = sum(position_count(chunk[q::world], self.packed) for chunk in chunks for q in range(world))
        return mine, positions
