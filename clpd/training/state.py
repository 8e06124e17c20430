"""Where a run is after an optimizer step (:class:`TrainState`: counters, optimizer, scaler and
RNG states): what the loop returns, a checkpoint saves and a resume starts from."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from clpd.errors import ClpdError


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}



def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



@dataclass
class TrainState:
    """Where a run is after an optimizer step: what the loop returns, a checkpoint saves and a
    resume starts from. The sampler's batches are a function of (seed, step) and the LR schedule
    one of the schedule step, so the counters are their whole state."""

    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # non-padding tokens read by the student
    answer_tokens_seen: int = 0  # tokens the loss was taken on
    skipped_steps: int = 0  # steps skipped for a non-finite loss (trainer.skip_nonfinite)
    teacher_switches: List[dict] = field(default_factory=list)
    teacher: Optional[int] = None  # the active teacher's index in the ladder
    train_time_s: float = 0.0  # training time, summed over the segments of a resumed run
    optimizer: Optional[dict] = None
    scaler: Optional[dict] = None
    rng: Optional[dict] = None  # python, numpy, torch and CUDA generators
    checkpoint: Optional[str] = None  # the checkpoint this state was read from (not saved with it)

    SAVED = ("step", "tokens_seen", "answer_tokens_seen", "skipped_steps", "teacher_switches", "teacher",
             "train_time_s", "optimizer", "scaler", "rng")

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.SAVED}

    @classmethod
    def from_dict(cls, saved: dict, checkpoint: Optional[str] = None) -> "TrainState":
        """Also reads the string-keyed states of checkpoints written before TrainState existed:
        they hold the same keys, plus three derived ones (schedule_step, next_lr, sampler)."""
        missing = [name for name in cls.SAVED if name not in saved]
        if missing:
            raise ClpdError(f"checkpoint {checkpoint}: its training state lacks {', '.join(missing)}; it was written by "
                            f"another version of clpd and cannot be resumed from")
        return cls(**{name: saved[name] for name in cls.SAVED}, checkpoint=checkpoint)



@dataclass
class TrainResult:
    state: TrainState  # after the last step
    final_loss: float  # the loss of the last logged step
    history: List[dict]  # the logged records of this segment
