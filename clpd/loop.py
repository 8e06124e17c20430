"""The training loop, written out top to bottom.

One optimizer step = ``trainer.grad_accum`` micro-batches of the batch the sampler draws for that
step. The loss is summed over answer tokens and divided by the answer tokens of the *whole*
accumulated batch, so splitting a batch into micro-batches does not change the update.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from clpd.config import LrSchedule, TrainerConfig
from clpd.curriculum.sampler import Sampler
from clpd.data.batching import collate
from clpd.checkpoint import rng_state, set_rng_state
from clpd.errors import ClpdError, Interrupted
from clpd.losses import IGNORE_INDEX, cross_entropy_sum
from clpd.teachers import TeacherPool


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


def build_optimizer(model: torch.nn.Module, cfg: TrainerConfig, fused: bool) -> torch.optim.AdamW:
    # Weight decay on matrices only: decaying norms and biases only hurts (nanoGPT, GPT-2 recipe).
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused)


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    tokens_seen: int  # non-padding tokens read by the student
    answer_tokens_seen: int  # tokens the loss was taken on
    wall_time_s: float  # training time, summed over the segments of a resumed run
    history: List[dict]  # the logged records of this segment
    teacher_switches: List[dict]
    skipped_steps: int  # steps skipped for a non-finite loss (trainer.skip_nonfinite)
    state: dict  # the training state after the last step (see clpd.checkpoint)


class StopSignals:
    """SIGINT and SIGTERM ask the loop to stop after the current optimizer step (``requested``
    holds the signal); a second signal stops at once. Only the main thread can install handlers:
    elsewhere (a test runner thread, a notebook worker) signals keep their default behaviour."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, console: Console) -> None:
        self.console = console
        self.requested: Optional[int] = None
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:  # the second one: stop now (checkpoints are atomic, nothing breaks)
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.requested = signum
        self.console.print(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                           f"(send it again to stop at once)", soft_wrap=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


def require_tensorboard() -> None:
    """One clear error, before any work, when the optional tensorboard package is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ClpdError("trainer.tensorboard=true needs the tensorboard package: pip install tensorboard "
                        "(or set trainer.tensorboard=false; metrics.jsonl has the same numbers)")


def tensorboard_writer(log_dir: Path):
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


LossFn = Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor], torch.Tensor]


def sft_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    return cross_entropy_sum(student_logits, targets)


def train(model: torch.nn.Module, examples: Sequence[dict], sampler: Sampler, cfg: TrainerConfig, *,
          pad_id: int, device: torch.device, autocast_dtype: Optional[torch.dtype],
          metrics_path: Path, console: Console, loss_fn: LossFn = sft_loss,
          teachers: Optional[TeacherPool] = None, schedule: Optional[Callable[[int], int]] = None,
          evaluate: Optional[Callable[[torch.nn.Module], dict]] = None,
          save: Optional[Callable[[int, dict], Path]] = None, resume: Optional[dict] = None) -> TrainResult:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps (or until ``cfg.max_tokens`` tokens
    have been read) on the sampler's batches.

    With ``teachers``, ``schedule(step)`` names the teacher of each step; the pool loads it (after
    releasing the previous one) and each switch is logged to the console and ``metrics.jsonl``.
    ``loss_fn(student_logits, teacher_logits or None, targets)`` returns a sum over answer tokens.
    With ``evaluate`` and ``cfg.eval_every``, ``evaluate(model)`` runs every ``eval_every`` steps
    (a learning curve: is the student on a plateau or in the middle of a jump?) and its metrics
    are logged as ``{"event": "eval", "step", ...}`` lines.

    ``save(step, state)`` writes a checkpoint and returns its path; it is called every
    ``cfg.save_every`` steps and when SIGINT/SIGTERM stops the run (which then raises
    :class:`~clpd.errors.Interrupted`). ``resume``, a state that ``save`` was given, continues the
    run from there: same batches, same RNG, same optimizer, so the same weights as without the stop.
    """
    model.to(device).train()
    optimizer = build_optimizer(model, cfg, fused=device.type == "cuda")
    # autocast is chosen once; fp16 needs loss scaling, bf16 and fp32 do not.
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    micro_size = cfg.batch_size // cfg.grad_accum
    budget = cfg.max_tokens is not None

    step = tokens_seen = answer_tokens_seen = skipped = 0
    switches: List[dict] = []
    time_before = 0.0  # training time of the segments before a resume
    last_checkpoint: Optional[Path] = None
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        step, tokens_seen, answer_tokens_seen = resume["step"], resume["tokens_seen"], resume["answer_tokens_seen"]
        skipped, switches, time_before = resume["skipped_steps"], list(resume["teacher_switches"]), resume["train_time_s"]
        last_checkpoint = Path(resume["checkpoint"])
        if teachers is not None and resume["teacher"] is not None:
            teachers.get(resume["teacher"])  # the teacher that was active: no switch is logged for it

    def state() -> dict:
        at = schedule_step(step, tokens_seen, cfg)
        return {"step": step, "schedule_step": at, "tokens_seen": tokens_seen,
                "answer_tokens_seen": answer_tokens_seen, "skipped_steps": skipped, "teacher_switches": switches,
                "teacher": teachers.active_index if teachers is not None else None,
                "train_time_s": time_before + time.perf_counter() - start, "next_lr": lr_at(at, cfg),
                "sampler": {"seed": sampler.seed, "next_step": step}, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng_state()}

    history: List[dict] = []
    window_tokens, window_start = 0, time.perf_counter()
    start = time.perf_counter()
    loss_value = float("nan")
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    board = tensorboard_writer(metrics_path.parent / "tensorboard") if cfg.tensorboard else None
    if resume is not None:  # last: building the optimizer, loading the teacher must not move the RNG
        set_rng_state(resume["rng"])
    with metrics_path.open("a") as metrics_file, Progress(*columns, console=console) as progress, \
            StopSignals(console) as stop:
        def log(record: dict) -> None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

        bar = progress.add_task("train", total=cfg.max_tokens if budget else cfg.max_steps,
                                completed=tokens_seen if budget else step, stats="")
        while not finished(step, tokens_seen, cfg):
            at = schedule_step(step, tokens_seen, cfg)  # == step without a token budget
            lr = lr_at(at, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # Sorting the step's batch by length before splitting it into micro-batches only
            # changes how much padding each micro-batch carries, not the update: the loss is
            # normalised by the answer tokens of the whole step.
            batch = sorted((examples[i] for i in sampler.batch(step, at)), key=lambda e: len(e["input_ids"]))
            micro_batches = [collate(batch[i:i + micro_size], pad_id) for i in range(0, len(batch), micro_size)]
            answer_tokens = sum(int((mb["targets"] != IGNORE_INDEX).sum()) for mb in micro_batches)
            teacher = None
            pool = sampler.describe(at)
            if teachers is not None:
                previous = teachers.active_index
                teacher, switched = teachers.get(schedule(at))
                if switched:
                    event = {"event": "teacher_switch", "step": step, "from": teachers.name(previous),
                             "to": teachers.name(teachers.active_index)}
                    log(event)
                    switches.append(event)
                    console.print(f"step {step}: teacher {event['from']} -> {event['to']}", soft_wrap=True)
            step_tokens = sum(int(mb["attention_mask"].sum()) for mb in micro_batches)  # counted on the CPU: no sync
            step_loss = torch.zeros((), device=device)
            for mb in micro_batches:
                mb = {k: v.to(device) for k, v in mb.items()}
                teacher_logits = None
                if teacher is not None:
                    with torch.inference_mode(), autocast:
                        teacher_logits = teacher(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
                with autocast:
                    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
                loss = loss_fn(logits, teacher_logits, mb["targets"]) / max(answer_tokens, 1)
                # Free both models' logits before backward: they are the largest activations, and
                # keeping them would raise the backward's peak memory.
                del logits, teacher_logits
                scaler.scale(loss).backward()
                step_loss += loss.detach()  # stays on the device: .item() here would sync every micro-batch
            tokens_seen += step_tokens
            window_tokens += step_tokens
            answer_tokens_seen += answer_tokens

            # One sync per optimizer step, before the update: a non-finite loss must never reach
            # the weights (under fp16 the scaler skips inf *gradients* by itself; this is the loss).
            loss_now = step_loss.item()
            if math.isfinite(loss_now):
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                scaler.step(optimizer)
                scaler.update()
            else:
                ids = [e.get("id", "?") for e in batch]
                if not cfg.skip_nonfinite:
                    where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
                    raise ClpdError(f"the training loss became {loss_now} at step {step + 1} (examples {', '.join(map(str, ids))}); "
                                    f"{where}. Lower trainer.lr (now {cfg.lr}), check trainer.precision, or set "
                                    f"trainer.skip_nonfinite=true to skip such steps")
                skipped += 1
                log({"event": "skip_nonfinite", "step": step + 1, "loss": str(loss_now), "examples": ids})
                console.print(f"step {step + 1}: loss {loss_now}, step skipped ({skipped} so far)", soft_wrap=True)
                grad_norm = torch.tensor(float("nan"))
            optimizer.zero_grad(set_to_none=True)

            done = step = step + 1
            last = finished(done, tokens_seen, cfg)
            if done % cfg.log_every == 0 or last:
                loss_value = loss_now
                now = time.perf_counter()
                record = {"step": done, "loss": round(loss_now, 6) if math.isfinite(loss_now) else str(loss_now),
                          "lr": lr, "grad_norm": round(float(grad_norm), 6) if math.isfinite(grad_norm) else None,
                          "tokens_seen": tokens_seen, "answer_tokens_seen": answer_tokens_seen,
                          "tokens_per_s": round(window_tokens / max(now - window_start, 1e-9), 1),
                          "elapsed_s": round(time_before + now - start, 3), **pool, **({"schedule_step": at} if budget else {}),
                          "teacher": teachers.name(teachers.active_index) if teachers is not None else None}
                log(record)
                history.append(record)
                if board is not None:
                    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen", "pool"):
                        if isinstance(record.get(key), (int, float)):
                            board.add_scalar(f"train/{key}", record[key], done)
                window_tokens, window_start = 0, now
                stats = f"loss {loss_now:.4f}  lr {lr:.2e}  {record['tokens_per_s']:,.0f} tok/s  pool {pool['pool']}"
                if "difficulty" in pool:
                    stats += f" [{pool['difficulty'][0]:g}..{pool['difficulty'][1]:g}]"
                if record["teacher"]:
                    stats += f"  teacher {record['teacher']}"
                progress.update(bar, stats=stats)
                if not console.is_terminal:  # no live bar in a log file or CI: print the numbers instead
                    of = f"{done} ({tokens_seen:,}/{cfg.max_tokens:,} tokens)" if budget else f"{done}/{cfg.max_steps}"
                    console.print(f"step {of}  {stats}  {record['elapsed_s']:.0f}s", soft_wrap=True)
            if evaluate is not None and cfg.eval_every and done % cfg.eval_every == 0:
                event = {"event": "eval", "step": done, **evaluate(model)}
                model.train()  # evaluate() leaves the model in eval mode
                log(event)
                console.print(f"step {done}: eval strict accuracy {event['accuracy_strict']:.3f} "
                              f"(n={event['n']})", soft_wrap=True)
            progress.advance(bar, step_tokens if budget else 1)
            if save is not None and not last and (stop.requested or (cfg.save_every and done % cfg.save_every == 0)):
                last_checkpoint = save(done, state())
            if stop.requested and not last:
                name = signal.Signals(stop.requested).name
                where = f"checkpoint {last_checkpoint}" if save is not None else "no checkpoint (trainer.save=false)"
                raise Interrupted(stop.requested, f"stopped by {name} after step {done}; {where}", resumable=save is not None)

    if board is not None:
        board.close()
    return TrainResult(steps=step, final_loss=loss_value, tokens_seen=tokens_seen,
                       answer_tokens_seen=answer_tokens_seen, wall_time_s=time_before + time.perf_counter() - start,
                       history=history, teacher_switches=switches, skipped_steps=skipped, state=state())
