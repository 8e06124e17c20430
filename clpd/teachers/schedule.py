"""The teacher schedule: a pure function from the schedule step to the index of the ladder's teacher
that supervises it (strongest, weakest, fixed, or progressive: teacher k during stage k)."""

from __future__ import annotations

from typing import Callable, Sequence


from clpd.config.enums import Schedule
from clpd.config.schema import TeachersConfig
from clpd.curriculum.stages import stage_at


def teacher_index(step: int, *, schedule: Schedule, num_teachers: int, starts: Sequence[int],
                  fixed_index: int = 0) -> int:
    """Which teacher of the ladder (0 = weakest) supervises ``step``.

    ``starts`` are the first steps of stages 1..K-1 (from even stages, ``teachers.boundaries``, or
    the curriculum); ``progressive`` gives teacher k to stage k.
    """
    if schedule == Schedule.strongest:
        return num_teachers - 1
    if schedule == Schedule.weakest:
        return 0
    if schedule == Schedule.fixed:
        return fixed_index
    return min(stage_at(step, starts), num_teachers - 1)



def make_schedule(cfg: TeachersConfig, starts: Sequence[int]) -> Callable[[int], int]:
    """The schedule of ``cfg`` over stages beginning at ``starts`` (from clpd.curriculum.stages)."""
    names = [t.name for t in cfg.ladder]
    fixed_index = names.index(cfg.fixed) if cfg.schedule == Schedule.fixed else 0
    return lambda step: teacher_index(step, schedule=cfg.schedule, num_teachers=len(names), starts=starts,
                                      fixed_index=fixed_index)
