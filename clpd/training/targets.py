"""Sequence-level KD (``distill.targets=teacher``): each training example's answer is a solution
the active teacher of the schedule wrote to its prompt, not the benchmark's.

The teachers' solutions are written once and stored (:mod:`clpd.teachers.solutions`); here they
are only read. An example for which the active teacher kept no solution (``distill.keep=correct``
and none had the gold answer) is left out of the steps that teacher teaches, and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from clpd.data.batching import with_answer


@dataclass
class TeacherTargets:
    answers: Dict[int, List[List[List[int]]]]  # teacher index -> per training example -> its kept solutions (token ids)
    schedule: Callable[[int], int]  # schedule step -> the index of the teacher whose solutions are read
    seed: int

    def example(self, examples: Sequence[dict], index: int, step: int, at: int) -> Optional[dict]:
        """Training example ``index`` with a solution of schedule step ``at``'s teacher as its
        answer (one of its kept ones, drawn from ``(seed, step, index)`` when it kept several);
        None when that teacher kept none."""
        kept = self.answers[self.schedule(at)][index]
        if not kept:
            return None
        pick = 0 if len(kept) == 1 else int(np.random.default_rng([self.seed, step, index, 3]).integers(len(kept)))
        return with_answer(examples[index], kept[pick])
