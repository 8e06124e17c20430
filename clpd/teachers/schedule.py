"""The teacher schedule: a pure function from the schedule step to the index of the ladder's teacher
that supervises it (strongest, weakest, fixed, or progressive: teacher k during stage k)."""

from __future__ import annotations

import logging
from typing import Callable, List, Sequence

from clpd.config.enums import DistillLoss, Schedule
from clpd.config.schema import TeachersConfig, TrainConfig
from clpd.curriculum.stages import stage_at

log = logging.getLogger("clpd.teachers.schedule")


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


def idle_teachers(cfg: TeachersConfig, starts: Sequence[int], max_steps: int) -> List[str]:
    """The ladder's teachers that a progressive schedule gives none of ``max_steps`` steps: those
    whose stage is empty (under pool placement, a pool that starts past a stage's share skips it)."""
    if cfg.schedule != Schedule.progressive:
        return []  # the other schedules name their one teacher
    bounds = [0, *(min(s, max_steps) for s in starts), max_steps]  # stage k holds steps bounds[k] .. bounds[k+1]-1
    last = len(cfg.ladder) - 1  # stages past the ladder's end keep its strongest teacher (teacher_index)
    used = {min(k, last) for k in range(len(bounds) - 1) if bounds[k] < bounds[k + 1]}
    staged = cfg.ladder[:len(starts) + 1]  # with fewer stages than rungs, the last rungs have no stage at all
    return [t.name for i, t in enumerate(staged) if i not in used]


def warn_idle_teachers(tc: TrainConfig, starts: Sequence[int]) -> List[str]:
    """Warn of the rungs a progressive ladder's stages give no step (``clpd plan`` and ``clpd train``)."""
    idle = idle_teachers(tc.teachers, starts, tc.trainer.max_steps) if tc.distill.loss != DistillLoss.sft else []
    if idle:
        c = tc.curriculum
        log.warning("teachers.schedule=progressive: no step for %s, whose stage%s empty under "
                    "curriculum.stage_placement=%s (the pool starts at curriculum.start=%g of the data); "
                    "`clpd plan` shows the stages, and curriculum.stage_placement=steps gives every stage steps",
                    ", ".join(idle), " is" if len(idle) == 1 else "s are", c.stage_placement.value, c.start)
    return idle
