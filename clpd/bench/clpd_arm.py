"""The clpd arm of ``python -m clpd.bench.trl`` (off-policy): clpd's loop, called directly, on the
step batches of the benchmark's work, with a live teacher or its stored outputs, the output layer
fused with the loss or not (:class:`~clpd.bench.trl_arms.Arm`)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from pathlib import Path

import torch

from clpd.bench.common import clock
from clpd.bench.trl_arms import Arm, StepSampler, Work, field_names, load_pair, probe_kd, trainer_config
from clpd.config.model import ModelConfig
from clpd.losses.distill import distill_loss


def run_clpd(work: Work, arm: Arm) -> dict:
    """Child: clpd's loop, called directly, on the step batches of ``work``."""
    from rich.console import Console

    from clpd.teachers.live import TeacherPool
    from clpd.training.batches import Batches
    from clpd.training.log import Outputs
    from clpd.training.loop import train
    from clpd.training.step import Supervision

    if arm.stored:
        work = steps_only(work)
    tokenizer, student, teacher_spec = load_pair(work)
    seen = {"bounds": [], "positions": [], "clpd_tokens": [], "micro_batches": []}  # per step

    class TimedBatches(Batches):
        def step(self, *args, **kwargs):
            seen["bounds"].append(clock())  # the start of each step, then (below) the end of the last
            out = super().step(*args, **kwargs)
            seen["positions"].append(sum(int(mb["input_ids"].numel()) for mb in out.micro_batches))
            seen["clpd_tokens"].append(int(out.tokens))
            seen["micro_batches"].append(len(out.micro_batches))
            return out

    names = field_names(Batches)
    layout = {"packed": arm.packed} if "packed" in names else {}
    if "micro_batch_tokens" in names and arm.micro_batch_tokens:
        layout["micro_batch_tokens"] = work.args.micro_batch_tokens
    batches = TimedBatches(work.examples, StepSampler(work),
                           work.pad_id, **layout)
    loss_fn = functools.partial(distill_loss, loss="forward_kl", alpha=0.0, vocab_size=work.vocab)
    built = time.perf_counter()
    teachers = (stored_pool(work, teacher_spec, tokenizer) if arm.stored else
                TeacherPool([teacher_spec], tokenizer, device=torch.device("cpu"), dtype=torch.float32,
                            **fused_setting(arm, student, "fused" in inspect.signature(TeacherPool).parameters)))
    store_s = time.perf_counter() - built if arm.stored else None
    supervision = Supervision(loss_fn, teachers, schedule=lambda step: 0,
                              **fused_setting(arm, student, "fused" in field_names(Supervision)))
    result = train(student, batches, trainer_config(work, arm), supervision,
                   Outputs(None, Console(quiet=True)), device=torch.device("cpu"))
    seen["bounds"].append(clock())  # step k ends where step k+1 starts; the last one when train() returns
    from clpd.models.load import load_model

    teacher = load_model(teacher_spec, tokenizer).eval()
    return {**seen, "final_loss": result.final_loss, "probe_kd": probe_kd(student, teacher, work),
            "fused": supervision.fused if hasattr(supervision, "fused") else None,
            "store_build_s": store_s, "store_examples": len(work.examples) if arm.stored else None}


def steps_only(work: Work) -> Work:
    """``work`` cut to the examples its steps and its probe read, renumbered: the same batches in the
    same order, and a store built over these alone, as a run's store covers its own training set
    (not the benchmark's whole pool of problems)."""
    used = sorted({i for batch in work.step_batches for i in batch} | set(work.probe))
    at = {i: n for n, i in enumerate(used)}
    return dataclasses.replace(work, examples=[work.examples[i] for i in used],
                               step_batches=[[at[i] for i in batch] for batch in work.step_batches],
                               probe=[at[i] for i in work.probe])


def fused_setting(arm: Arm, student: torch.nn.Module, supported: bool) -> dict:
    """``fused=`` as the training run decides it (trainer.fused_loss, the arm's or null), where this
    checkout has the setting."""
    if not supported:
        return {}
    from clpd.training.head import FUSED_MIN_ROWS, output_rows, why_not_fused

    default = why_not_fused(student) is None and output_rows(student) >= FUSED_MIN_ROWS  # trainer.fused_loss=null
    return {"fused": arm.fused if arm.fused is not None else default}


def stored_pool(work: Work, teacher_spec: ModelConfig, tokenizer):
    """The teacher's stored top-32 outputs over the work's examples, built now into the work's folder
    (outside the timed steps; the arm reports the seconds), as a run's StorePool."""
    from rich.console import Console

    from clpd.teachers.store import StorePool, prepare_stores

    stores = prepare_stores([teacher_spec], [0], work.examples, cache_dir=str(Path(work.student_dir).parent / "stores"),
                            top_k=32, max_length=512, tokenizer=tokenizer, batch_size=16, device=torch.device("cpu"),
                            dtype=torch.float32, autocast_dtype=None, console=Console(quiet=True))
    return StorePool([teacher_spec], stores)
