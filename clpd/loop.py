"""The training loop, written out top to bottom.

One optimizer step = ``trainer.grad_accum`` micro-batches of the batch the sampler draws for that
step (:func:`optimizer_step`). The loss is summed over answer tokens and divided by the answer
tokens of the *whole* accumulated batch, so splitting a batch into micro-batches does not change
the update. :func:`train` repeats it: learning rate, batch, teacher, step, log, checkpoint.
Everything the loop reports goes through :class:`TrainLog`; where it is goes into a
:class:`TrainState`, which it returns and resumes from (``clpd.checkpoint`` saves and loads it).
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from clpd.config import LrSchedule, TrainerConfig
from clpd.curriculum.sampler import Sampler
from clpd.data.batching import answer_mask, answer_token_count, collate, cut_by_tokens, pack, position_count, read_token_count
from clpd.distributed import all_reduce_sum, all_reduce_max, ranks
from clpd.errors import ClpdError, Interrupted
from clpd.losses import LossTerms, cross_entropy_sum
from clpd.teachers import TeacherPool


# --- schedules -----------------------------------------------------------------------------------

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


# --- the training state --------------------------------------------------------------------------

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


# --- one optimizer step ----------------------------------------------------------------------------

LossFn = Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor], LossTerms]


def sft_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], targets: torch.Tensor) -> LossTerms:
    ce = cross_entropy_sum(student_logits, targets)
    return LossTerms(ce, ce=ce)


@dataclass
class StepResult:
    loss: float  # per answer token; nan/inf when the step was not applied
    terms: Dict[str, torch.Tensor]  # "ce" and "kd" per answer token, when both were computed (on the device)
    grad_norm: float  # before clipping; nan when the step was not applied
    answer_tokens: int

    @property
    def applied(self) -> bool:
        return math.isfinite(self.loss)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   micro_batches: Sequence[Dict[str, torch.Tensor]], *, answer_tokens: int, loss_fn: LossFn,
                   teacher: Optional[torch.nn.Module], autocast, grad_clip: float) -> StepResult:
    """Accumulate the gradients of ``micro_batches`` (one step's batch, or this rank's share of
    it) and update the weights.

    Each micro-batch's summed loss is divided by ``answer_tokens``, the answer tokens of the whole
    step over all ranks, so two micro-batches give the update of one batch of the same examples,
    and N ranks the update of one process. A non-finite loss never reaches the weights: the step is
    then not applied on any rank (the caller decides what that means).
    """
    world = ranks().world_size
    device = next(model.parameters()).device
    step_loss = torch.zeros((), device=device)
    terms: Dict[str, torch.Tensor] = {}
    for i, mb in enumerate(micro_batches):
        mb = dict(mb)
        examples = mb.pop("index", None)  # indices into the training set: where stored teacher outputs are found
        mb = {k: v.to(device) for k, v in mb.items()}
        # Logits at answer positions only: both models apply their output layer (152k rows for Qwen)
        # to the positions the loss reads, flattened to [answer positions, V] in row-major order.
        targets = mb.pop("targets")
        keep = answer_mask(targets)
        targets = targets[keep]
        mb["logits_to_keep"], mb["use_cache"] = keep, False  # no cache: packed rows' bounds come from position_ids
        teacher_logits = None
        if isinstance(teacher, torch.nn.Module):
            # no_grad, not inference_mode: the chunked loss reads (and its checkpoints keep) these logits
            # as they are, where inference tensors would first have to be copied (one more [N, V] matrix).
            with torch.no_grad(), autocast:
                teacher_logits = teacher(**mb).logits
        elif teacher is not None:  # a store (clpd.teacher_store): the top-k rows of these examples
            teacher_logits = teacher.rows(examples.tolist(), device)
        # DDP all-reduces gradients in the backward of the last micro-batch only.
        sync = model.no_sync() if world > 1 and i < len(micro_batches) - 1 else nullcontext()
        with sync:
            with autocast:
                logits = model(**mb).logits
            parts = loss_fn(logits, teacher_logits, targets)
            loss = parts.total / max(answer_tokens, 1)
            # Free both models' logits before backward: they are the largest activations, and
            # keeping them would raise the backward's peak memory.
            del logits, teacher_logits
            scaler.scale(loss * world).backward()  # DDP averages over ranks; the loss is a sum over them
        step_loss += loss.detach()  # stays on the device: .item() here would sync every micro-batch
        if parts.ce is not None and parts.kd is not None:  # both terms of a mixed loss: logged apart
            for name in ("ce", "kd"):
                terms[name] = terms.get(name, 0.0) + getattr(parts, name).detach() / max(answer_tokens, 1)

    # One sync per optimizer step, before the update (under fp16 the scaler skips inf *gradients*
    # by itself; this is the loss): the sum over ranks, so that all of them step or none.
    totals = all_reduce_sum(torch.stack([step_loss, *terms.values()]))
    loss_now = totals[0].item()
    terms = dict(zip(terms, totals[1:]))
    grad_norm = float("nan")
    if math.isfinite(loss_now):
        scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf")))
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_now, terms, grad_norm, answer_tokens)


# --- what the loop reads and where it reports --------------------------------------------------

@dataclass
class StepBatch:
    examples: List[dict]  # the step's whole batch (every rank's), sorted by length
    micro_batches: List[Dict[str, torch.Tensor]]  # this rank's share of each micro-batch, in its layout
    tokens: int  # tokens the student reads that predict a next token, over all ranks
    positions: int  # positions the models compute, padding included, over all ranks
    answer_tokens: int  # targets the loss is taken on, over all ranks: what the loss is divided by


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

    def step(self, step: int, at: int, micro_size: int) -> StepBatch:
        """The batch of optimizer step ``step`` (pool of schedule step ``at``) as micro-batches.

        Sorting the step's batch by length before cutting it only changes how much padding each
        micro-batch carries, not the update: the loss is normalised by the whole step's answer
        tokens. Under torchrun rank r takes examples r, r + N, ... of every micro-batch, so the
        ranks together see exactly the single-process batch, in lengths that are about equal."""
        order = sorted(self.sampler.batch(step, at), key=lambda i: len(self.examples[i]["input_ids"]))
        batch = [self.examples[i] for i in order]
        chunks = (cut_by_tokens(batch, self.micro_batch_tokens, self.packed) if self.micro_batch_tokens
                  else [batch[i:i + micro_size] for i in range(0, len(batch), micro_size)])
        starts = np.cumsum([0, *map(len, chunks)])
        r = ranks()
        layout = pack if self.packed else functools.partial(collate, pad_id=self.pad_id)
        # Each micro-batch also says which examples it holds ("index"): stored teacher outputs are found by example.
        mine = [{**layout(chunk[r.rank::r.world_size]),
                 "index": torch.tensor(order[a:b][r.rank::r.world_size], dtype=torch.long)}
                for chunk, a, b in zip(chunks, starts, starts[1:])]
        positions = sum(position_count(chunk[q::r.world_size], self.packed) for chunk in chunks for q in range(r.world_size))
        return StepBatch(batch, mine, read_token_count(batch), positions, answer_token_count(batch))


@dataclass
class Supervision:
    """What the student learns from: ``loss_fn(student_logits, teacher_logits or None, targets)``,
    and for distillation the teachers with ``schedule(schedule_step)`` naming each step's teacher."""
    loss_fn: LossFn = sft_loss
    teachers: Optional[TeacherPool] = None
    schedule: Optional[Callable[[int], int]] = None


@dataclass
class Outputs:
    """Where the loop reports: ``metrics.jsonl`` (None: nowhere, as on ranks other than 0), the
    console, checkpoints (``save(step, state)`` writes one and returns its path) and a learning
    curve (``evaluate(model)`` every ``trainer.eval_every`` steps)."""
    metrics_path: Optional[Path]
    console: Console
    save: Optional[Callable[[int, TrainState], Path]] = None
    evaluate: Optional[Callable[[torch.nn.Module], dict]] = None


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
    BOARD_KEYS = ("loss", "ce", "kd", "lr", "grad_norm", "tokens_per_s", "positions_per_s", "tokens_seen", "pool")

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
        self.progress = Progress(*self.COLUMNS, console=self.console).__enter__()
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
             elapsed_s: float) -> dict:
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
                  "teacher": teacher}
        self.write(record)
        self.history.append(record)
        if self.board is not None:
            for key in self.BOARD_KEYS:
                if isinstance(record.get(key), (int, float)):
                    self.board.add_scalar(f"train/{key}", record[key], state.step)
        self.window_tokens, self.window_positions, self.window_start = 0, 0, now
        stats = f"loss {loss:.4f}"
        if result.terms:
            stats += f" (ce {record['ce']:.4f} kd {record['kd']:.4f})"
        stats += f"  lr {lr:.2e}  {record['tokens_per_s']:,.0f} tok/s  pool {pool['pool']}"
        if "difficulty" in pool:
            stats += f" [{pool['difficulty'][0]:g}..{pool['difficulty'][1]:g}]"
        if teacher:
            stats += f"  teacher {teacher}"
        self.progress.update(self.bar, stats=stats)
        if not self.console.is_terminal:  # no live bar in a log file or CI: print the numbers instead
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


# The notice a scheduler sends before it stops a job: submitit asks SLURM for SIGUSR2 (sbatch
# --signal=USR2@<signal_delay_s>: that long before the time limit, and at once on a preemption)
# and requeues the job from its handler. SUBMITIT_PREEMPT_SIGNAL names another one for both.
PREEMPT_SIGNAL = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


class StopSignals:
    """SIGINT, SIGTERM and the scheduler's notice (:data:`PREEMPT_SIGNAL`) ask the loop to stop
    after the current optimizer step (``requested`` holds the signal); a second SIGINT or SIGTERM
    stops at once, the notice never does (a step and a checkpoint fit in its delay). ``preempted``
    says that the notice came: the run then hands it on (:func:`hand_on`) once its checkpoint is
    written. Only the main thread can install handlers: elsewhere (a test runner thread, a
    notebook worker) signals keep their default behaviour."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, PREEMPT_SIGNAL)

    def __init__(self, console: Console) -> None:
        self.console = console
        self.requested: Optional[int] = None
        self.preempted = False
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == PREEMPT_SIGNAL:
            self.preempted = True
        elif self.requested is not None:  # the second one: stop now (checkpoints are atomic, nothing breaks)
            self.__exit__()
            signal.raise_signal(signum)
            return
        if self.requested is None:
            self.requested = signum
            self.console.print(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                               f"(send SIGINT or SIGTERM again to stop at once)", soft_wrap=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


def hand_on(signum: int) -> None:
    """Call the handler that was installed for ``signum`` before clpd's, once the run has written
    its checkpoint and status. Under submitit that is its requeue: it resubmits the same job (which
    continues from the checkpoint with trainer.resume=auto) and exits the process."""
    handler = signal.getsignal(signum)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signum, None)


def refuse_nonfinite(cfg: TrainerConfig, state: TrainState, loss: float, batch: Sequence[dict]) -> dict:
    """A step whose loss is nan/inf (its update was not applied): stop the run with one line, or,
    with ``trainer.skip_nonfinite``, count it and return the event to log."""
    ids = [e.get("id", "?") for e in batch]
    if not cfg.skip_nonfinite:
        where = f"the last good checkpoint is {state.checkpoint}" if state.checkpoint else "no checkpoint was written yet"
        raise ClpdError(f"the training loss became {loss} at step {state.step + 1} (examples {', '.join(map(str, ids))}); "
                        f"{where}. Lower trainer.lr (now {cfg.lr}), check trainer.precision, or set "
                        f"trainer.skip_nonfinite=true to skip such steps")
    state.skipped_steps += 1
    return {"event": "skip_nonfinite", "step": state.step + 1, "loss": str(loss), "examples": ids}


# --- the loop --------------------------------------------------------------------------------------

def train(model: torch.nn.Module, batches: Batches, cfg: TrainerConfig, supervision: Supervision, outputs: Outputs, *,
          device: torch.device, autocast_dtype: Optional[torch.dtype] = None,
          resume: Optional[TrainState] = None) -> TrainResult:
    """Train ``model`` for ``cfg.max_steps`` optimizer steps (or until ``cfg.max_tokens`` tokens
    have been read) on the sampler's batches, from ``resume`` if given: same batches, same RNG,
    same optimizer, so the same weights as without the stop.

    SIGINT/SIGTERM stop the run after the current step with a checkpoint (``outputs.save``) and
    raise :class:`~clpd.errors.Interrupted`.
    """
    model.to(device).train()
    trained = wrap_ranks(model, device)  # the model itself in one process; under torchrun a DDP wrapper of it
    optimizer = build_optimizer(model, cfg, fused=device.type == "cuda")
    # autocast is chosen once; fp16 needs loss scaling, bf16 and fp32 do not.
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    teachers = supervision.teachers
    state = TrainState() if resume is None else replace(resume, teacher_switches=list(resume.teacher_switches),
                                                        optimizer=None, scaler=None, rng=None)
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        scaler.load_state_dict(resume.scaler)
        if teachers is not None and resume.teacher is not None:
            teachers.get(resume.teacher)  # the teacher that was active: no switch is logged for it
        set_rng_state(resume.rng)  # last: building the optimizer, loading the teacher must not move the RNG
    time_before, start = state.train_time_s, time.perf_counter()

    def snapshot() -> TrainState:
        return replace(state, teacher_switches=list(state.teacher_switches), train_time_s=time_before + time.perf_counter() - start,
                       teacher=teachers.active_index if teachers is not None else None, optimizer=optimizer.state_dict(),
                       scaler=scaler.state_dict(), rng=rng_state())

    final_loss = float("nan")
    with TrainLog(cfg, outputs, state) as log, StopSignals(outputs.console) as stop:
        while not finished(state.step, state.tokens_seen, cfg):
            at = schedule_step(state.step, state.tokens_seen, cfg)  # == step without a token budget
            lr = lr_at(at, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = batches.step(state.step, at, cfg.batch_size // cfg.grad_accum)
            # The teacher is not kept in a variable of the loop: a switch must free the old one before it loads the next.
            result = optimizer_step(trained, optimizer, scaler, batch.micro_batches, answer_tokens=batch.answer_tokens,
                                    loss_fn=supervision.loss_fn, autocast=autocast, grad_clip=cfg.grad_clip,
                                    teacher=switch_teacher(supervision, at, state, log) if teachers is not None else None)
            if not result.applied:
                event = refuse_nonfinite(cfg, state, result.loss, batch.examples)
                log.event(event, f"step {state.step + 1}: loss {result.loss}, step skipped ({state.skipped_steps} so far)")
            state.step += 1
            state.tokens_seen += batch.tokens
            state.answer_tokens_seen += batch.answer_tokens
            log.read(batch.tokens, batch.positions)
            last = finished(state.step, state.tokens_seen, cfg)

            if state.step % cfg.log_every == 0 or last:
                final_loss = result.loss
                log.step(state, result, lr=lr, at=at, pool=batches.sampler.describe(at),
                         teacher=teachers.name(teachers.active_index) if teachers is not None else None,
                         elapsed_s=time_before + time.perf_counter() - start)
            if outputs.evaluate is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
                curve = {"event": "eval", "step": state.step, **outputs.evaluate(model)}
                model.train()  # evaluate() leaves the model in eval mode
                log.event(curve, f"step {state.step}: eval strict accuracy {curve['accuracy_strict']:.3f} (n={curve['n']})")
            stopping = all_reduce_max(stop.requested or 0)  # the signal a rank received: it stops them all
            if outputs.save is not None and not last and (stopping or (cfg.save_every and state.step % cfg.save_every == 0)):
                state.checkpoint = str(outputs.save(state.step, snapshot()))
            if stopping and not last:
                where = f"checkpoint {state.checkpoint}" if outputs.save is not None else "no checkpoint (trainer.save=false)"
                raise Interrupted(stopping, f"stopped by {signal.Signals(stopping).name} after step {state.step}; "
                                            f"{where}", resumable=outputs.save is not None,
                                  hand_on=PREEMPT_SIGNAL if stop.preempted else None)
    return TrainResult(snapshot(), final_loss, log.history)


def wrap_ranks(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Under torchrun, ``model`` in DistributedDataParallel: it starts from rank 0's weights and
    averages the gradients over the ranks in the backward of each step's last micro-batch."""
    if not ranks().distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def switch_teacher(supervision: Supervision, at: int, state: TrainState, log: TrainLog) -> torch.nn.Module:
    """The teacher of schedule step ``at``, loaded if it is not the active one (a logged switch)."""
    teachers = supervision.teachers
    previous = teachers.active_index
    teacher, switched = teachers.get(supervision.schedule(at))
    if switched:
        event = {"event": "teacher_switch", "step": state.step, "from": teachers.name(previous),
                 "to": teachers.name(teachers.active_index)}
        state.teacher_switches.append(event)
        log.event(event, f"step {state.step}: teacher {event['from']} -> {event['to']}")
    return teacher
