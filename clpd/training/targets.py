"""Sequence-level KD (``distill.targets=teacher``): each training example's answer is a solution
the active teacher of the schedule wrote to its prompt, not the benchmark's.

The teachers' solutions are written once and stored (:mod:`clpd.teachers.solutions`); here they
are only read. An example for which the active teacher kept no solution (``distill.keep=correct``
and none had the gold answer) is left out of the steps that teacher teaches, and counted. Stored
teacher outputs on these targets are one store per teacher over its list of kept solutions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from clpd.data.batching import with_answer


@dataclass
class TeacherTargets:
    answers: Dict[int, List[List[List[int]]]]  # teacher index -> per training example -> its kept solutions (token ids)
    schedule: Callable[[int], int]  # schedule step -> the index of the teacher whose solutions are read
    seed: int
    starts: Dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False)  # teacher -> _starts, once

    def written(self, examples: Sequence[dict], index: int, step: int, at: int) -> Optional[Tuple[dict, int]]:
        """Training example ``index`` with a solution of schedule step ``at``'s teacher as its
        answer (one of its kept ones, drawn from ``(seed, step, index)`` when it kept several), and
        that solution's row in the teacher's list of solutions (:meth:`solution_examples`, where
        stored teacher outputs are found); None when that teacher kept none."""
        teacher = self.schedule(at)
        kept = self.answers[teacher][index]
        if not kept:
            return None
        pick = 0 if len(kept) == 1 else int(np.random.default_rng([self.seed, step, index, 3]).integers(len(kept)))
        return with_answer(examples[index], kept[pick]), int(self._starts(teacher)[index]) + pick

    def solution_examples(self, teacher: int, examples: Sequence[dict]) -> List[dict]:
        """Every kept solution of ``teacher`` as a training example, example by example, in sample
        order: what its stored outputs are built on (row r is the solution :meth:`written` names r)."""
        return [with_answer(examples[i], answer) for i, kept in enumerate(self.answers[teacher]) for answer in kept]

    def _starts(self, teacher: int) -> np.ndarray:
        """Where each example's solutions begin in the teacher's list."""
        if teacher not in self.starts:
            self.starts[teacher] = np.concatenate([[0], np.cumsum([len(kept) for kept in self.answers[teacher]])])
        return self.starts[teacher]
