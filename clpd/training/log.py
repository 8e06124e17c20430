"""Everything the loop reports (:class:`TrainLog`): ``metrics.jsonl``, the progress bar (plain
lines without a terminal), TensorBoard scalars and tokens/s; :class:`Outputs` says where."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from clpd.config.schema import TrainerConfig
from clpd.errors import ClpdError
from clpd.progress import plain_lines, progress_bar
from clpd.training.state import TrainState
from clpd.training.step import StepResult


def require_tensorboard() -> None:
    """One clear error, before any work, when the optional tensorboard package is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ClpdError("trainer.tensorboard=true needs the tensorboard package: pip install tensorboard "
                        "(or set trainer.tensorboard=false; metrics.jsonl has the same numbers)")



class TrainLog:
    """Everything the loop reports: lines of ``metrics.jsonl`` (events and logged steps), the
    progress bar (or plain lines when the console is not a terminal), TensorBoard scalars, and
    the tokens/s of each logging window. A context manager: it opens and closes all of them."""

    COLUMNS = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    BOARD_KEYS = ("loss", "ce", "kd", "kd_sampled", "sampled_tokens", "sample_length_mean", "lr", "grad_norm", "tokens_per_s", "positions_per_s", "tokens_seen", "pool")

    def __init__(self, cfg: TrainerConfig, outputs: Outputs, state: TrainState) -> None:
        self.cfg, self.console, self.path = cfg, outputs.console, outputs.metrics_path
        self.budget = cfg.max_tokens is not None
        self.completed = state.tokens_seen if self.budget else state.step
        self.history: List[dict] = []
        self.window_tokens, self.window_positions, self.window_start = 0, 0, time.perf_counter()

    def __enter__(self) -> "TrainLog":
        self.file = self.path.open("a") if self.path is not None else None
        self.board = None
        if self.cfg.tensorboard and self.path is not None:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(log_dir=str(self.path.parent / "tensorboard"))
        self.progress = progress_bar(self.console, *self.COLUMNS).__enter__()  # step() prints plain lines without a terminal
        total = self.cfg.max_tokens if self.budget else self.cfg.max_steps
        self.bar = self.progress.add_task("train", total=total, completed=self.completed, stats="")
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)
        if self.board is not None:
            self.board.close()
        if self.file is not None:
            self.file.close()

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def event(self, record: dict, message: str) -> None:
        self.write(record)
        self.console.print(message, soft_wrap=True)

    def step(self, state: TrainState, result: StepResult, *, lr: float, at: int, pool: dict, teacher: Optional[str],
             elapsed_s: float, drawn: Optional[dict] = None) -> dict:
        """Log optimizer step ``state.step`` (just done): a metrics line, the progress line, tensorboard."""
        now = time.perf_counter()
        loss = result.loss
        record = {"step": state.step, "loss": round(loss, 6) if math.isfinite(loss) else str(loss),
                  **{name: round(value.item(), 6) for name, value in result.terms.items()},
                  "lr": lr, "grad_norm": round(result.grad_norm, 6) if math.isfinite(result.grad_norm) else None,
                  "tokens_seen": state.tokens_seen, "answer_tokens_seen": state.answer_tokens_seen,
                  "tokens_per_s": round(self.window_tokens / max(now - self.window_start, 1e-9), 1),
                  "positions_per_s": round(self.window_positions / max(now - self.window_start, 1e-9), 1),
                  "elapsed_s": round(elapsed_s, 3), **pool, **({"schedule_step": at} if self.budget else {}),
                  "teacher": teacher, **(drawn or {})}
        self.write(record)
        self.history.append(record)
        if self.board is not None:
            for key in self.BOARD_KEYS:
                if isinstance(record.get(key), (int, float)):
                    self.board.add_scalar(f"train/{key}", record[key], state.step)
        self.window_tokens, self.window_positions, self.window_start = 0, 0, now
        stats = f"loss {loss:.4f}"
        if "ce" in result.terms:
            stats += f" (ce {record['ce']:.4f} kd {record['kd']:.4f})"
        if record.get("samples"):
            stats += f"  sampled kd {record['kd_sampled']:.4f}, {record['samples'] / max(record['sample_s'], 1e-9):.1f} samples/s"
        stats += f"  lr {lr:.2e}  {record['tokens_per_s']:,.0f} tok/s  pool {pool['pool']}"
        if "difficulty" in pool:
            stats += f" [{pool['difficulty'][0]:g}..{pool['difficulty'][1]:g}]"
        if teacher:
            stats += f"  teacher {teacher}"
        self.progress.update(self.bar, stats=stats)
        if plain_lines(self.console):  # no live bar in a log file or CI: print the numbers instead
            of = (f"{state.step} ({state.tokens_seen:,}/{self.cfg.max_tokens:,} tokens)" if self.budget
                  else f"{state.step}/{self.cfg.max_steps}")
            self.console.print(f"step {of}  {stats}  {record['elapsed_s']:.0f}s", soft_wrap=True)
        return record

    def read(self, tokens: int, positions: int) -> None:
        """One more optimizer step, which read ``tokens`` tokens in ``positions`` positions (padding
        included): the progress bar, tokens/s and positions/s."""
        self.window_tokens += tokens
        self.window_positions += positions
        self.progress.advance(self.bar, tokens if self.budget else 1)


@dataclass
class Outputs:
    """Where the loop reports: ``metrics.jsonl`` (None: nowhere, as on ranks other than 0), the
    console, checkpoints (``save(step, state)`` writes one and returns its path) and a learning
    curve (``evaluate(model)`` every ``trainer.eval_every`` steps)."""
    metrics_path: Optional[Path]
    console: Console
    save: Optional[Callable[[int, TrainState], Path]] = None
    evaluate: Optional[Callable[[torch.nn.Module], dict]] = None
