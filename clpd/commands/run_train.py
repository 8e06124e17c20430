"""The pipeline of ``clpd train`` (:mod:`clpd.commands.train` is its Hydra app): distil (or
fine-tune) a student on a benchmark's training split.

``run_train`` is a pipeline of named steps, in the order the data flows: check the config, build
the teacher ladder, encode the data, build the student, choose the supervision (loss, teachers,
schedule), order and pace the data (the curriculum's sampler), resume if asked, train, and finish
(final checkpoint, evaluation, summary).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
from omegaconf import DictConfig
from rich.console import Console
from transformers import PreTrainedTokenizerBase

from clpd.training.checkpoint import FINAL, make_manifest, prune_checkpoints, step_name, write_checkpoint
from clpd.config.enums import Difficulty, Targets, TeacherOutputs
from clpd.config.schema import TrainConfig, to_object
from clpd.curriculum.sampler import Sampler, build_sampler
from clpd.curriculum.stages import stage_starts
from clpd.curriculum.score_cache import load_scores, save_scores
from clpd.curriculum.scorers import compute_scores, given_difficulty, is_curriculum, needs_model, per_example_loss, scorers
from clpd.training.distributed import alone, barrier, device_for, main_first, ranks
from clpd.data import load_problems
from clpd.data.batching import packing_is_exact, prompt_length, read_token_count
from clpd.data.prompts import encode_problems
from clpd.errors import ClpdError
from clpd.evaluation.evaluate import evaluate, evaluate_checkpoint, evaluate_into
from clpd.files import fingerprint, plain_json, write_json
from clpd.teachers.ladder import Ladder, build_ladder, ladder_needed, ladder_table
from clpd.training.batches import Batches
from clpd.training.log import Outputs
from clpd.training.state import TrainResult, TrainState
from clpd.training.head import FUSED_MIN_ROWS, output_rows, why_not_fused
from clpd.training.loop import train
from clpd.models.load import apply_lora, count_parameters, load_model, load_tokenizer, resolve_device, resolve_precision
from clpd.preflight import check_train
from clpd.training.resume import finished_run, resume_source, resume_student
from clpd.environment import environment
from clpd.commands.job import recorded_status
from clpd.teachers.store import describe
from clpd.teachers.live import teacher_dtype
from clpd.teachers.schedule import warn_idle_teachers
from clpd.teachers.supervision import build_supervision, solutions_of, stored_outputs, teacher_outputs_summary, teacher_targets

log = logging.getLogger("clpd.commands.run_train")


@dataclass
class Run:
    """What every step of a training run reads: the typed config ``tc`` (``cfg``, the composed
    DictConfig, only to be written into checkpoints and manifests as the user wrote it), where it
    writes, and the device it runs on."""
    cfg: DictConfig
    tc: TrainConfig
    run_dir: Path
    console: Console
    device: torch.device
    autocast_dtype: Optional[torch.dtype]
    tokenizer: PreTrainedTokenizerBase  # the student's; every teacher shares its vocabulary
    started: float  # perf_counter at the start, for summary.json's wall time


@dataclass
class Data:
    problems: list
    examples: list  # encoded with the student's tokenizer, in the problems' order
    overlong: int  # examples longer than trainer.max_length (dropped or truncated)


@dataclass
class Student:
    model: torch.nn.Module
    scratch_base: Optional[torch.nn.Module]  # a from-scratch LoRA base, saved beside the adapter


def start_run(cfg: DictConfig, tc: TrainConfig, run_dir: Path, console: Console) -> Run:
    """Threads, device, precision and the student's tokenizer: what every later step needs."""
    started = time.perf_counter()
    if tc.trainer.num_threads:
        torch.set_num_threads(tc.trainer.num_threads)
    device = device_for(resolve_device(tc.trainer.device))
    console = console if ranks().main else Console(quiet=True)  # under torchrun rank 0 speaks for the run
    return Run(cfg, tc, run_dir, console, device, resolve_precision(tc.trainer.precision, device),
               load_tokenizer(tc.student, tc.teachers.ladder), started)  # a cut student: its source's


def prepare_ladder(run: Run) -> Ladder:
    """The teacher ladder, its from-scratch rungs trained if they are not in the cache yet."""
    if not ladder_needed(run.tc):
        return Ladder([], [])
    # Under torchrun rank 0 builds what is missing, alone; the other ranks then find it in the cache.
    ladder = main_first(lambda: build_ladder(run.tc, run.tokenizer, run.console, train=alone(run_train),
                                             evaluate=evaluate_checkpoint))
    if ranks().main:
        write_json(run.run_dir / "teachers.json", ladder.rows)
    run.console.print(ladder_table(ladder.rows))
    return ladder


def load_data(run: Run) -> Data:
    """The training problems, encoded with the student's tokenizer."""
    tc = run.tc
    problems = load_problems(tc.benchmark, tc.benchmark.train_split, tc.benchmark.train_limit)
    if not problems:
        raise ClpdError(f"benchmark={tc.benchmark.label()} split {tc.benchmark.train_split} has no problems")
    data = Data(*encode_problems(problems, run.tokenizer, tc.benchmark.chat_template, tc.trainer.max_length,
                                 tc.trainer.overlong.value))
    budget, longest = tc.trainer.micro_batch_tokens, max(read_token_count([e]) for e in data.examples)
    what, d = "training example", tc.distill
    # a sample (the student's, or a teacher's solution): a prompt and up to max_new_tokens answer tokens
    new_tokens = max(d.generation.max_new_tokens if d.on_policy > 0 else 0,
                     d.teacher_generation.max_new_tokens if d.targets == Targets.teacher else 0)
    if new_tokens:
        sample = max(prompt_length(e) for e in data.examples) + new_tokens - 1
        what, longest = ("training example", longest) if longest >= sample else ("possible sample", sample)
    if budget is not None and budget < longest:
        raise ClpdError(f"trainer.micro_batch_tokens={budget} is smaller than the longest {what} ({longest} "
                        f"tokens); allowed: >= {longest}, or null (grad_accum micro-batches)")
    return data


def choose_layout(run: Run, model: torch.nn.Module) -> bool:
    """Packed micro-batches where the student keeps packed examples apart (``trainer.packing=null``
    or true), padded ones otherwise; a run that asks for packing on a model that cannot is refused."""
    setting = run.tc.trainer.packing
    if setting is False:
        return False
    if setting is None and run.device.type == "cpu":
        # Measured (clpd.bench.trl, 2 CPU cores): sdpa builds a mask over the whole packed row,
        # quadratic in its length, so packed steps ran at half the speed of length-sorted padded ones.
        return False
    if packing_is_exact(model):
        return True
    attention = getattr(model.config, "_attn_implementation", "?")
    if setting:
        raise ClpdError(f"trainer.packing=true: the student's attention ({attention}) does not keep packed examples "
                        f"apart (their logits differ from those of the examples alone); allowed: false, or null")
    run.console.print(f"trainer.packing: padded micro-batches (the student's attention, {attention}, does not keep "
                      f"packed examples apart)", soft_wrap=True)
    return False


def choose_fused(run: Run, model: torch.nn.Module) -> bool:
    """The output layer fused with the loss where the student allows it (true, or null with a real
    vocabulary: ``FUSED_MIN_ROWS``); a run that asks for it on a student that does not is refused."""
    setting = run.tc.trainer.fused_loss
    if setting is False or (setting is None and output_rows(model) < FUSED_MIN_ROWS):
        return False
    why = why_not_fused(model)
    if why is not None and setting:
        raise ClpdError(f"trainer.fused_loss=true: the student's logits cannot be fused with the loss ({why}); "
                        f"allowed: false, or null")
    if why is not None:
        log.info("trainer.fused_loss: unfused (%s)", why)
    return why is None


def build_student(run: Run, ladder: Ladder) -> Student:
    """The student, seeded (from-scratch weights and LoRA init are a function of the seed)."""
    tc = run.tc
    torch.manual_seed(tc.seed)
    lora = tc.student.lora.enabled
    # With LoRA the frozen base can sit in the autocast dtype (bf16 on CUDA); the adapters stay fp32.
    model = load_model(tc.student, run.tokenizer, dtype=(run.autocast_dtype or torch.float32) if lora else torch.float32,
                       teachers=[*ladder.specs, *tc.teachers.ladder])  # init_from may name a teacher (built first)
    scratch_base = copy.deepcopy(model) if lora and tc.student.path is None else None
    if lora:
        model = apply_lora(model, tc.student.lora)
    log.info("student %s: %.2fM parameters (%.2fM trainable); device %s, %s", tc.student.name,
             count_parameters(model) / 1e6, count_parameters(model, True) / 1e6, run.device,
             run.autocast_dtype or torch.float32)
    return Student(model, scratch_base)












def curriculum_sampler(run: Run, data: Data, student: torch.nn.Module, ladder: Ladder,
                       packed: bool) -> tuple[Sampler, Optional[List[float]]]:
    """Score, order and pace the training set (the explicit curriculum) into the run's sampler;
    returns it with the scores (None without a curriculum).

    Scores are cached in ``difficulty.json`` in the run dir, keyed by the scorer and the data.
    """
    tc, device, examples = run.tc, run.device, data.examples
    c, n = tc.curriculum, len(examples)
    scores = None
    if is_curriculum(c) or not needs_model(c) or given_difficulty(data.problems) is not None:  # model scores only when the order depends on them
        meta = {"difficulty": c.difficulty.value, "rrf_scorers": [s.value for s in c.rrf_scorers],
                "teacher": c.teacher, "student": tc.student.path or tc.student.name, "seed": tc.seed,
                "data": fingerprint(examples),
                **({"teacher_generation": plain_json(tc.distill.teacher_generation), "teacher_samples": tc.distill.teacher_samples}
                   if Difficulty.teacher_cot_steps in scorers(c) else {})}
        cache = run.run_dir / "difficulty.json"
        scores = load_scores(cache, meta)
        if scores is None:
            def loss_of(model):
                run.console.print(f"scoring {n} examples by the loss of {getattr(model, 'name_or_path', '') or 'a model'}")
                return per_example_loss(model.to(device), examples, batch_size=c.score_batch_size, device=device,
                                        pad_id=run.tokenizer.pad_token_id, packed=packed)  # the loop's layout

            def teacher_loss():
                spec = next(t for t in ladder.specs if t.name == c.teacher)
                return loss_of(load_model(spec, run.tokenizer, dtype=teacher_dtype(run.autocast_dtype)))

            def teacher_cot_steps():  # the reasoning steps of the teacher's own (first) solution
                index = [t.name for t in ladder.specs].index(c.teacher)
                return solutions_of(run, ladder, data, [index])[index].steps(n)

            scores = compute_scores(c, data.problems, examples, tc.seed, {
                Difficulty.student_loss: lambda: loss_of(student), Difficulty.teacher_loss: teacher_loss,
                Difficulty.teacher_cot_steps: teacher_cot_steps})
            save_scores(cache, scores, meta)
    return build_sampler(tc, scores, n), None if scores is None else [float(x) for x in scores]


def outputs(run: Run, student: Student, manifest: dict, saves: List[dict]) -> Outputs:
    """Where the loop writes: metrics.jsonl, step checkpoints (trainer.save_every, on a signal) and
    a learning curve (trainer.eval_every)."""
    tc = run.tc
    checkpoints = run.run_dir / "checkpoints"

    def save(step: int, state: TrainState) -> Path:
        path = checkpoints / step_name(step)
        if ranks().main:  # the weights are the same on every rank
            seconds = write_checkpoint(path, model=student.model, tokenizer=run.tokenizer, cfg=run.cfg,
                                       base=student.scratch_base, state=state, manifest=manifest,
                                       metrics=run.run_dir / "metrics.jsonl")
            prune_checkpoints(checkpoints, tc.trainer.keep_last)
            saves.append({"step": step, "seconds": round(seconds, 3)})
            run.console.print(f"step {step}: checkpoint {path} ({seconds:.2f}s)", soft_wrap=True)
        barrier()  # no rank goes on (or exits after a signal) before the checkpoint is complete
        return path

    curve = None
    if tc.trainer.eval_every and ranks().main:
        problems = load_problems(tc.benchmark, tc.benchmark.eval_split, tc.trainer.eval_every_limit)

        def curve(model):
            return evaluate(model, run.tokenizer, problems, tc.benchmark, **generation(run), console=None)[1]
    metrics = run.run_dir / "metrics.jsonl" if ranks().main else None
    return Outputs(metrics, run.console, save=save if tc.trainer.save else None, evaluate=curve)


def generation(run: Run) -> dict:
    return {"batch_size": run.tc.trainer.eval_batch_size, "max_new_tokens": run.tc.trainer.eval_max_new_tokens,
            "device": run.device, "autocast_dtype": run.autocast_dtype, "calculator": run.tc.trainer.eval_calculator}


def finish(run: Run, student: Student, result: TrainResult, ladder: Ladder, data: Data, manifest: dict,
           saves: List[dict], resumed_from: Optional[str], teacher_outputs: dict) -> dict:
    """The final checkpoint, the final evaluation (into <run>/eval), the merged model and summary.json."""
    tc, model, state = run.tc, student.model, result.state
    if not ranks().main:  # rank 0 writes the run's results
        return {"rank": ranks().rank, "steps": state.step, "final_loss": result.final_loss}
    checkpoint = run.run_dir / "checkpoints" / FINAL
    if tc.trainer.save:
        seconds = write_checkpoint(checkpoint, model=model, tokenizer=run.tokenizer, cfg=run.cfg, base=student.scratch_base,
                                   state=state, manifest=manifest, metrics=run.run_dir / "metrics.jsonl")
        saves.append({"step": state.step, "seconds": round(seconds, 3), "final": True})
    final_eval = None
    if tc.trainer.eval_at_end:
        final_eval = evaluate_into(run.run_dir / "eval", model, run.tokenizer, tc.benchmark, header={},
                                   **generation(run), console=run.console)
        calculator = " (calculator)" if tc.trainer.eval_calculator else ""  # the teachers are scored without it
        student_row = {"name": f"student {tc.student.name}{calculator}", "parameters": count_parameters(model),
                       "accuracy_strict": final_eval["accuracy_strict"], "by_difficulty": final_eval["by_difficulty"]}
        run.console.print(ladder_table([*ladder.rows, student_row],
                                       f"{tc.benchmark.label()}/{tc.benchmark.eval_split}: teachers and the student"))
    if tc.trainer.save and tc.student.lora.enabled and tc.student.lora.merge_on_save:  # last: merging rewrites the model
        write_checkpoint(run.run_dir / "checkpoints" / "merged", model=model.merge_and_unload(), tokenizer=run.tokenizer,
                         cfg=run.cfg)
    summary = {
        "steps": state.step, "final_loss": result.final_loss, "tokens_seen": state.tokens_seen,
        "answer_tokens_seen": state.answer_tokens_seen, "train_time_s": round(state.train_time_s, 2),
        "wall_time_s": round(time.perf_counter() - run.started, 2), "student_parameters": count_parameters(model),
        "train_examples": len(data.examples), "overlong_examples": data.overlong, "skipped_steps": state.skipped_steps,
        "teacher_switches": state.teacher_switches, "resumed_from": resumed_from,
        "checkpoint_saves": saves, "environment": environment(run.device),
        "checkpoint": str(checkpoint) if tc.trainer.save else None, "eval": final_eval,
        "teacher_outputs": teacher_outputs,
    }
    write_json(run.run_dir / "summary.json", summary)
    run.console.print(f"[bold green]done[/] {state.step} steps in {state.train_time_s:.0f}s, final loss "
                      f"{result.final_loss:.4f}; run dir {run.run_dir}", soft_wrap=True)
    return summary


def build_teachers_only(run: Run, ladder: Ladder, data: Data) -> dict:
    """``teachers.build_only=true``: the ladder is built (and evaluated); with distill.targets=teacher
    every rung writes its solutions, and with stored outputs every rung's store is built (on those
    solutions, or the gold ones); no student is trained. Returns the summary it writes."""
    stored = run.tc.distill.teacher_outputs == TeacherOutputs.stored and ladder.specs
    targets, written = teacher_targets(run, ladder, data)
    stores = main_first(lambda: stored_outputs(run, ladder, data, targets)) if stored else {}
    summary = {"teachers": ladder.rows, "stores": describe(stores, ladder.specs), **({"solutions": written} if targets else {}),
               "wall_time_s": round(time.perf_counter() - run.started, 2)}
    write_json(run.run_dir / "summary.json", summary)
    return summary


def run_train(cfg: DictConfig, run_dir: Path, console: Console | None = None) -> dict:
    """Train as ``cfg`` says and write everything into ``run_dir``; returns the summary."""
    console = console or Console()
    run_dir.mkdir(parents=True, exist_ok=True)
    done = finished_run(cfg, run_dir, console)  # before status.json: a refused rerun must not mark it failed
    if done is not None:
        return done
    with recorded_status(run_dir):  # a refused config is recorded as a failed run too (for reports)
        tc: TrainConfig = to_object(cfg)  # every schema check runs here, before any work
        resume_from = resume_source(tc.trainer, run_dir)
        check_train(tc)  # every other check that needs no weights or data, before the first teacher is built
        run = start_run(cfg, tc, run_dir, console)
        data = load_data(run)  # before the teachers: a token budget too small for the data is refused first
        ladder = prepare_ladder(run)
        if tc.teachers.build_only:  # the ladder (and its stores) ahead of a sweep, no student
            return build_teachers_only(run, ladder, data)
        student = build_student(run, ladder)
        packed = choose_layout(run, student.model)  # padded or packed micro-batches, for scoring and training
        sampler, scores = main_first(lambda: curriculum_sampler(run, data, student.model, ladder, packed))  # cached by rank 0
        starts = stage_starts(tc, sampler)  # where the stages begin: one list for the schedule and the targets
        warn_idle_teachers(tc, starts)
        targets, written = teacher_targets(run, ladder, data, starts)  # sequence-level KD: the teachers' solutions
        supervision = build_supervision(run, ladder, data, starts, targets, fused=choose_fused(run, student.model))
        in_use = ladder.in_use() if supervision.teachers is not None or targets else []  # the rungs built and loaded
        manifest = make_manifest(cfg, teachers=[{"name": t.name, "source": t.path} for t in in_use],
                                 data=fingerprint(data.examples), scores=scores)
        resume = resume_student(resume_from, manifest, student.model, run_dir, console,
                                force=tc.trainer.resume_force) if resume_from else None
        saves: List[dict] = []
        batches = Batches(data.examples, sampler, run.tokenizer.pad_token_id, packed=packed,
                          micro_batch_tokens=tc.trainer.micro_batch_tokens,
                          choose=supervision.on_policy.choose if supervision.on_policy else None, targets=targets)
        result = train(student.model, batches, tc.trainer, supervision, outputs(run, student, manifest, saves),
                       device=run.device, autocast_dtype=run.autocast_dtype, resume=resume)
        if supervision.teachers is not None:
            supervision.teachers.release()
        summary = finish(run, student, result, ladder, data, manifest, saves, resume and resume.checkpoint,
                         {**teacher_outputs_summary(run, supervision),
                          **({"targets": "teacher", "keep": tc.distill.keep.value, "solutions": written} if targets else {})})
    return summary
