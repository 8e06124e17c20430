"""Where a run is in its schedule: the learning rate of a step, the schedule step under a token
budget, and when the run is finished. Pure functions of the step, the tokens read and the config."""

from __future__ import annotations

import math


from clpd.config.enums import LrSchedule
from clpd.config.schema import TrainerConfig


def lr_at(step: int, cfg: TrainerConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then decay to
    ``lr * min_lr_ratio`` at the last step (cosine or linear), or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == LrSchedule.constant:
        return cfg.lr
    decay_steps = max(1, cfg.max_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.lr_schedule == LrSchedule.cosine else 1.0 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape)



def schedule_step(step: int, tokens_seen: int, cfg: TrainerConfig) -> int:
    """Where the LR schedule, the pacing and the teacher stages are: at optimizer step ``step``,
    or, under a token budget, at the share of ``trainer.max_tokens`` read so far (in steps of
    ``max_steps``). Equal steps are not equal compute when arms read examples of different
    lengths; equal budgets are, and each arm still runs its whole schedule once."""
    if cfg.max_tokens is None:
        return step
    return min(cfg.max_steps - 1, tokens_seen * cfg.max_steps // cfg.max_tokens)



def finished(step: int, tokens_seen: int, cfg: TrainerConfig) -> bool:
    return tokens_seen >= cfg.max_tokens if cfg.max_tokens is not None else step >= cfg.max_steps
