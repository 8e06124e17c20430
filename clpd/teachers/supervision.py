"""What the student of ``clpd train`` learns from: the loss, the teachers of the schedule (live or
their stored outputs), the student's own samples (on-policy) and the teachers' written solutions
(sequence-level KD), each built or read from the cache where it is missing. ``clpd train``'s
pipeline (clpd.commands.run_train) calls these with its ``Run`` and ``Data`` records."""

from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch

from clpd.config.enums import DistillLoss, Keep, Targets, TeacherOutputs
from clpd.evaluation.evaluate import sample_answers
from clpd.losses.distill import distill_loss
from clpd.teachers.ladder import Ladder, distilling_teachers
from clpd.teachers.live import TeacherPool, teacher_dtype
from clpd.teachers.schedule import make_schedule
from clpd.teachers.solutions import TeacherSolutions, describe_solutions, prepare_solutions
from clpd.teachers.store import StorePool, TeacherStore, describe, prepare_stores
from clpd.training.distributed import main_first
from clpd.training.on_policy import OnPolicy
from clpd.training.step import Supervision, sft_loss
from clpd.training.targets import TeacherTargets


def build_supervision(run: Run, ladder: Ladder, data: Data, starts: List[int], targets: Optional[TeacherTargets] = None,
                      fused: bool = False) -> Supervision:
    """Gold solutions (SFT), or a divergence to the teachers of the schedule (its stages begin at
    ``starts``): their live forward, or their stored top-k outputs (built first where missing, on
    ``targets`` where the teachers wrote them). ``fused``: the loss takes the student's (and live
    teachers') output layer."""
    tc = run.tc
    if tc.distill.loss == DistillLoss.sft:
        return Supervision(functools.partial(sft_loss, slice_size=tc.distill.vocab_slice_size), fused=fused)
    d = tc.distill
    # Only the rows that the tokenizer, the student and every teacher share are compared.
    loss_fn = functools.partial(distill_loss, loss=d.loss.value, alpha=d.alpha, temperature=d.temperature, beta=d.beta,
                                lam=d.skew_lambda, chunk_size=d.chunk_size, vocab_size=len(run.tokenizer),
                                slice_size=d.vocab_slice_size)
    if d.teacher_outputs == TeacherOutputs.stored:
        teachers = StorePool(ladder.specs, main_first(lambda: stored_outputs(run, ladder, data, targets)))
    else:
        teachers = TeacherPool(ladder.specs, run.tokenizer, device=run.device, dtype=teacher_dtype(run.autocast_dtype),
                               fused=fused)
    schedule = make_schedule(tc.teachers, starts)
    if d.on_policy == 0:
        return Supervision(loss_fn, teachers, schedule, fused=fused)
    g, tok = d.generation, run.tokenizer
    autocast = torch.autocast(run.device.type, dtype=run.autocast_dtype) if run.autocast_dtype else nullcontext()
    sample = functools.partial(sample_answers, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, autocast=autocast,
                               max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p)
    return Supervision(loss_fn, teachers, schedule, on_policy=OnPolicy(d.on_policy, tc.seed, sample, tok.eos_token_id),
                       sampled_loss_fn=functools.partial(loss_fn, gold=False), fused=fused)


def stored_outputs(run: Run, ladder: Ladder, data: Data, targets: Optional[TeacherTargets] = None) -> Dict[int, TeacherStore]:
    """The stores of the teachers the schedule uses (all rungs with teachers.build_only), built where
    missing: on the gold solutions, or on each teacher's own kept solutions (``targets``)."""
    tc = run.tc
    used = range(len(ladder.specs)) if tc.teachers.build_only else distilling_teachers(tc)
    prepare = functools.partial(prepare_stores, ladder.specs, cache_dir=tc.teachers.cache_dir, top_k=tc.distill.top_k,
                                max_length=tc.trainer.max_length, tokenizer=run.tokenizer,
                                batch_size=tc.distill.store_batch_size, device=run.device,
                                dtype=teacher_dtype(run.autocast_dtype), autocast_dtype=run.autocast_dtype,
                                console=run.console)
    if targets is None:
        return prepare(list(used), data.examples)
    return {i: prepare([i], targets.solution_examples(i, data.examples))[i] for i in used}


def solutions_of(run: Run, ladder: Ladder, data: Data, used: List[int]) -> Dict[int, TeacherSolutions]:
    """The solutions the rungs ``used`` wrote to the training prompts (written where missing)."""
    tc, d = run.tc, run.tc.distill
    return prepare_solutions(ladder.specs, used, data.problems, data.examples, cache_dir=tc.teachers.cache_dir,
                             samples=d.teacher_samples, decoding=d.teacher_generation, seed=tc.seed,
                             tokenizer=run.tokenizer, numeric=tc.benchmark.numeric_answers(),
                             batch_size=tc.trainer.eval_batch_size, device=run.device,
                             dtype=teacher_dtype(run.autocast_dtype), autocast_dtype=run.autocast_dtype,
                             console=run.console)


def teacher_targets(run: Run, ladder: Ladder, data: Data,
                    starts: Optional[List[int]] = None) -> tuple[Optional[TeacherTargets], List[dict]]:
    """Sequence-level KD: the solutions of the schedule's teachers (its stages begin at ``starts``;
    all rungs with teachers.build_only, which trains no student: None) as the run's targets, written
    where missing, and what each teacher wrote and kept (for summary.json); (None, []) on gold."""
    tc, d = run.tc, run.tc.distill
    if d.targets != Targets.teacher:
        return None, []
    n = len(data.examples)
    used = list(range(len(ladder.specs))) if tc.teachers.build_only else distilling_teachers(tc)
    solutions = main_first(lambda: solutions_of(run, ladder, data, used))
    correct_only = d.keep == Keep.correct
    answers = {i: s.kept(n, correct_only) for i, s in solutions.items()}
    targets = TeacherTargets(answers, make_schedule(tc.teachers, starts or []), tc.seed)
    return targets, describe_solutions(solutions, ladder.specs, correct_only, n)


def teacher_outputs_summary(run: Run, supervision: Supervision) -> dict:
    """Where the run's teacher logits came from, for summary.json and clpd report."""
    if supervision.teachers is None:
        return {"source": None}
    if isinstance(supervision.teachers, StorePool):
        return {"source": "stored", "top_k": run.tc.distill.top_k or len(run.tokenizer),
                "stores": describe(supervision.teachers.stores, supervision.teachers.specs)}
    return {"source": "live"}
