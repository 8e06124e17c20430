"""On-policy distillation (GKD's lambda): the share of each step's examples that the student answers
itself, the active teacher then scoring the sampled tokens (``distill.on_policy``).

Which examples are answered is drawn from ``(seed, step)``, and each step's samples come from a
torch generator seeded from ``(seed, step)`` and restored afterwards, so a resumed run draws and
samples exactly what the uninterrupted one did, and the run's own RNG never moves: with a share of
0 nothing here runs at all and the run is the off-policy run, bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List

import numpy as np
import torch

from clpd.data.batching import prompt_length, with_answer

# (model, prompts as token ids) -> the model's sampled answers, each up to and with its eos
Sample = Callable[[torch.nn.Module, List[List[int]]], List[List[int]]]


def chosen(share: float, seed: int, step: int, n: int) -> np.ndarray:
    """Which of optimizer step ``step``'s ``n`` examples the student answers: each with probability
    ``share``, drawn from ``(seed, step)`` alone (a boolean mask; ``clpd plan`` shows the same)."""
    return np.random.default_rng([seed, step, 1]).random(n) < share


@dataclass
class SampleStats:
    """One step's samples on this rank."""
    samples: int = 0
    tokens: int = 0  # sampled answer tokens
    unfinished: int = 0  # samples that reached the budget of new tokens without an eos
    seconds: float = 0.0  # generation wall time

    def record(self) -> dict:
        return {"samples": self.samples, "sampled_tokens": self.tokens, "unfinished_samples": self.unfinished,
                "sample_length_mean": round(self.tokens / self.samples, 3) if self.samples else None,
                "sample_s": round(self.seconds, 4)}


@dataclass
class OnPolicy:
    share: float  # lambda: each example of a step is answered by the student with this probability
    seed: int
    sample: Sample
    eos_id: int

    def choose(self, step: int, n: int) -> np.ndarray:
        return chosen(self.share, self.seed, step, n)

    def answer(self, model: torch.nn.Module, examples: List[dict], step: int) -> tuple[List[dict], SampleStats]:
        """``examples`` with the student's own answers in place of the gold ones (the loss is taken
        on the sampled tokens), sampled in eval mode without gradients."""
        if not examples:
            return [], SampleStats()
        started = time.perf_counter()
        device = next(model.parameters()).device
        was_training = model.training
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(np.random.default_rng([self.seed, step, 2]).integers(2 ** 62)))
            model.eval()
            try:
                answers = self.sample(model, [e["input_ids"][:prompt_length(e)] for e in examples])
            finally:
                model.train(was_training)
        stats = SampleStats(len(answers), sum(map(len, answers)), sum(1 for a in answers if not a or a[-1] != self.eos_id),
                            time.perf_counter() - started)
        return [with_answer(e, a) for e, a in zip(examples, answers)], stats
