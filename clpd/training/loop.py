"""The training loop, written out top to bottom.

One optimizer step = ``trainer.grad_accum`` micro-batches of the batch the sampler draws for that
step (:func:`optimizer_step`). The loss is summed over answer tokens and divided by the answer
tokens of the *whole* accumulated batch, so splitting a batch into micro-batches does not change
the update. :func:`train` repeats it: learning rate, batch, teacher, step, log, checkpoint.
Everything the loop reports goes through :class:`TrainLog`; where it is goes into a
:class:`TrainState`, which it returns and resumes from (``clpd.training.checkpoint`` saves and loads it).
"""

from __future__ import annotations

import signal
import time
from contextlib import nullcontext
from dataclasses import replace
from typing import Optional, Sequence

import torch

from clpd.config.schema import TrainerConfig
from clpd.training.distributed import all_reduce_max, ranks
from clpd.errors import ClpdError, Interrupted
from clpd.training.batches import Batches, StepBatch
from clpd.training.log import Outputs, TrainLog
from clpd.training.schedule import finished, lr_at, schedule_step
from clpd.training.signals import PREEMPT_SIGNAL, StopSignals
from clpd.training.state import TrainResult, TrainState, rng_state, set_rng_state
from clpd.training.step import StepResult, Supervision, build_optimizer, optimizer_step




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
            batch, drawn = draw_batch(batches, supervision, model, state.step, at, cfg.batch_size // cfg.grad_accum)
            # The teacher is not kept in a variable of the loop: a switch must free the old one before it loads the next.
            result = step_on(trained, optimizer, scaler, batch, supervision, autocast, cfg.grad_clip,
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
                log.step(state, result, lr=lr, at=at, pool=batches.sampler.describe(at), drawn=drawn,
                         teacher=teachers.name(teachers.active_index) if teachers is not None else None,
                         elapsed_s=time_before + time.perf_counter() - start)
            if outputs.evaluate is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
                curve = {"event": "eval", "step": state.step, **outputs.evaluate(model)}
                model.train()  # evaluate() leaves the model in eval mode
                log.event(curve, f"step {state.step}: eval strict accuracy {curve['accuracy_strict']:.3f} (n={curve['n']})")
            stop.announce()
            stopping = all_reduce_max(stop.requested or 0)  # the signal a rank received: it stops them all
            if outputs.save is not None and not last and (stopping or (cfg.save_every and state.step % cfg.save_every == 0)):
                state.checkpoint = str(outputs.save(state.step, snapshot()))
            if stopping and not last:
                where = f"checkpoint {state.checkpoint}" if outputs.save is not None else "no checkpoint (trainer.save=false)"
                raise Interrupted(stopping, f"stopped by {signal.Signals(stopping).name} after step {state.step}; "
                                            f"{where}", resumable=outputs.save is not None,
                                  hand_on=PREEMPT_SIGNAL if stop.preempted else None)
    return TrainResult(snapshot(), final_loss, log.history)


def draw_batch(batches: Batches, supervision: Supervision, model: torch.nn.Module, step: int, at: int,
               micro_size: int) -> tuple[StepBatch, dict]:
    """Optimizer step ``step``'s batch (pool of schedule step ``at``); on-policy, with the share the
    student answers itself sampled now, from the weights the step starts from. Also what the step's
    metrics line says of it: its samples, and the examples left out for want of a teacher's solution."""
    batch = batches.step(step, at, micro_size)
    said = {"left_out": batch.left_out} if batches.targets is not None else {}
    if supervision.on_policy is None:
        return batch, said
    answers, samples = supervision.on_policy.answer(model, batch.to_answer, step)
    return batches.answered(batch, answers, micro_size), {**said, **samples.record()}


def step_on(model: torch.nn.Module, optimizer, scaler, batch: StepBatch, supervision: Supervision, autocast,
            grad_clip: float, teacher) -> StepResult:
    """One optimizer step on ``batch``: its gold micro-batches, then the student's own samples."""
    return optimizer_step(model, optimizer, scaler, batch.micro_batches, answer_tokens=batch.answer_tokens,
                          loss_fn=supervision.loss_fn, autocast=autocast, grad_clip=grad_clip, teacher=teacher,
                          sampled=batch.sampled, sampled_tokens=batch.sampled_tokens,
                          sampled_loss_fn=supervision.sampled_loss_fn, fused=supervision.fused)


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
