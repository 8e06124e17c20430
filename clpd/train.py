"""``clpd train``: distil (or fine-tune) a student on a benchmark's training split."""

from __future__ import annotations

import copy
import functools
import json
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import List, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from clpd.config import BenchmarkName, Difficulty, DistillLoss, TrainConfig, register_configs, to_object
from clpd.curriculum.sampler import Sampler
from clpd.curriculum.difficulty import fingerprint, load_scores, per_example_loss, save_scores
from clpd.curriculum.scoring import compute_scores, is_curriculum, needs_model, scorers
from clpd.curriculum.stages import build_sampler, stage_starts
from clpd.data import load_problems
from clpd.data.prompts import encode_problems
from clpd.errors import ClpdError
from clpd.loop import require_tensorboard, sft_loss, train
from clpd.losses import distill_loss_sum
from clpd.models import (apply_lora, count_parameters, load_model, load_tokenizer, resolve_device,
                         resolve_precision)
from clpd.evaluate import evaluate
from clpd.checkpoint import (FINAL, MANIFEST_FILE, METRICS_FILE, checkpoint_step, complete_checkpoints,
                             load_student_weights, load_training_state, make_manifest, manifest_differences,
                             prune_checkpoints, step_name, write_checkpoint)
from clpd.runs import recorded_status, run_command, write_json, write_jsonl
from clpd.teachers import (TeacherPool, build_teacher, check_ladder_order, check_vocabularies, make_schedule,
                           summarize_ladder, teacher_accuracy, teacher_dtype)

log = logging.getLogger("clpd.train")
register_configs()


def _ladder_table(rows: List[dict], title: str = "teachers") -> Table:
    table = Table(title=title)
    for column in ("model", "parameters", "strict acc", "by steps"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for r in rows:
        by = r["by_difficulty"] or {}
        table.add_row(r["name"], f"{r['parameters'] / 1e6:.2f}M" if r["parameters"] else "?",
                      f"{r['accuracy_strict']:.3f}" if r["accuracy_strict"] is not None else "-",
                      " ".join(f"{k}:{v['accuracy_strict']:.2f}" for k, v in by.items()))
    return table


def prepare_teachers(tc: TrainConfig, tokenizer, console: Console) -> tuple[list, list]:
    """Check the ladder before any training (vocabularies, order), then build what is missing."""
    ladder = tc.teachers.ladder
    check_vocabularies(tokenizer, tc.student.name, [(t.name, load_tokenizer(t)) for t in ladder])
    sizes = check_ladder_order(ladder, tokenizer)
    built = [build_teacher(t, tc, console) for t in ladder]
    rows = summarize_ladder(built, sizes, [teacher_accuracy(t, tc) if t.path is None else None for t in ladder])
    return built, rows


def curriculum_sampler(tc: TrainConfig, problems, examples, *, student, teacher_specs, tokenizer, device,
                       run_dir: Path, console: Console) -> tuple[Sampler, Optional[List[float]]]:
    """Score, order and pace the training set (the explicit curriculum) into the run's sampler;
    returns it with the scores (None without a curriculum).

    Scores are cached in ``difficulty.json`` in the run dir, keyed by the scorer and the data.
    """
    c, n = tc.curriculum, len(examples)
    scores = None
    if is_curriculum(c) or not needs_model(c):  # model scores only when the order depends on them
        meta = {"difficulty": c.difficulty.value, "rrf_scorers": [s.value for s in c.rrf_scorers],
                "teacher": c.teacher, "student": tc.student.path or tc.student.name, "seed": tc.seed,
                "data": fingerprint(examples)}
        cache = run_dir / "difficulty.json"
        scores = load_scores(cache, meta)
        if scores is None:
            def loss_of(model):
                console.print(f"scoring {n} examples by the loss of {getattr(model, 'name_or_path', '') or 'a model'}")
                return per_example_loss(model.to(device), examples, batch_size=c.score_batch_size, device=device,
                                        pad_id=tokenizer.pad_token_id)

            def teacher_loss():
                spec = next(t for t in teacher_specs if t.name == c.teacher)
                return loss_of(load_model(spec, tokenizer, dtype=teacher_dtype(resolve_precision(tc.trainer.precision, device))))

            scores = compute_scores(c, problems, examples, tc.seed, {Difficulty.student_loss: lambda: loss_of(student),
                                                                       Difficulty.teacher_loss: teacher_loss})
            save_scores(cache, scores, meta)
    return build_sampler(tc, scores, n), None if scores is None else [float(x) for x in scores]


def score_problems(tc: TrainConfig, model, tokenizer, problems, device, autocast_dtype, console):
    return evaluate(model, tokenizer, problems, chat_template=tc.benchmark.chat_template,
                    numeric=tc.benchmark.name == BenchmarkName.svamp, batch_size=tc.trainer.eval_batch_size,
                    max_new_tokens=tc.trainer.eval_max_new_tokens, device=device, autocast_dtype=autocast_dtype,
                    console=console)


def evaluate_final(tc: TrainConfig, model, tokenizer, device, autocast_dtype, run_dir: Path, console: Console) -> dict:
    """The trained student on the benchmark's eval split, as ``clpd eval`` scores it, into ``<run>/eval``."""
    problems = load_problems(tc.benchmark, tc.benchmark.eval_split, tc.benchmark.eval_limit)
    records, metrics = score_problems(tc, model, tokenizer, problems, device, autocast_dtype, console)
    metrics = {"benchmark": tc.benchmark.name.value, "split": tc.benchmark.eval_split, **metrics}
    (run_dir / "eval").mkdir(exist_ok=True)
    write_jsonl(run_dir / "eval" / "predictions.jsonl", records)
    write_json(run_dir / "eval" / "metrics.json", metrics)
    return metrics


def environment(device: torch.device) -> dict:
    """What else a bit-for-bit rerun must match: the same run on another thread count, torch
    version or processor reaches other weights (another summation order, other kernels)."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine())
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device), "cpu": cpu}


def _read_lines(path: str) -> List[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def finished_run(cfg: DictConfig, run_dir: Path, console: Console) -> dict:
    """``trainer.resume=auto`` on a run that already finished: nothing to do, if it is the same run.
    (So a sweep launched again with resume=auto continues where it stopped and skips what is done.)"""
    manifest = run_dir / "checkpoints" / FINAL / MANIFEST_FILE
    if manifest.exists():
        saved = {"config": json.loads(manifest.read_text())["config"]}
        differences = manifest_differences(saved, {"config": OmegaConf.to_container(cfg, resolve=True)})
        if differences:
            raise ClpdError(f"{run_dir} already holds a finished run with another config ({'; '.join(differences)}); "
                            f"choose another hydra.run.dir")
    console.print(f"{run_dir} already finished (trainer.resume=auto): nothing to resume", soft_wrap=True)
    return json.loads((run_dir / "summary.json").read_text())


def resume_source(tc: TrainConfig, run_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from, or None; refuses what would lose or mix up work."""
    steps = complete_checkpoints(run_dir / "checkpoints")
    if tc.trainer.resume is None:
        if steps:
            raise ClpdError(f"{run_dir} holds checkpoints of an unfinished run ({steps[-1].name}); continue it with "
                            f"trainer.resume=auto, or choose another hydra.run.dir")
        return None
    if tc.trainer.resume == "auto":
        if not steps:
            log.info("trainer.resume=auto: no checkpoint in %s yet; starting from step 0", run_dir / "checkpoints")
        return steps[-1] if steps else None
    source = Path(tc.trainer.resume).expanduser().resolve()
    source_step = checkpoint_step(source)  # None for ``final`` or a folder elsewhere: every step is later
    later = [p.name for p in steps
             if p.resolve() != source and (source_step is None or checkpoint_step(p) > source_step)]
    if later:
        raise ClpdError(f"trainer.resume={tc.trainer.resume}: {run_dir} already holds later checkpoints ({', '.join(later)}), "
                        f"which resuming from an earlier one would overwrite; resume with trainer.resume=auto or "
                        f"choose another hydra.run.dir")
    return source


def resume_student(tc: TrainConfig, source: Path, manifest: dict, model, run_dir: Path, console: Console) -> dict:
    """Check ``source`` against this run, load its weights into ``model`` and its log into the run
    dir; returns the training state to continue from."""
    state = load_training_state(source)  # verifies the checkpoint first
    saved = json.loads((source / MANIFEST_FILE).read_text())
    differences = manifest_differences(saved, manifest)
    if differences and not tc.trainer.resume_force:
        raise ClpdError(f"trainer.resume: {source} was written by a different run: {'; '.join(differences)}. "
                        f"Resume with the same settings, or set trainer.resume_force=true")
    for d in differences:
        log.warning("resuming despite a difference (trainer.resume_force=true): %s", d)
    load_student_weights(model, source)
    # The log continues from the checkpoint's copy: lines written after it (by the stopped run) go.
    shutil.copyfile(source / METRICS_FILE, run_dir / "metrics.jsonl")
    state["checkpoint"] = str(source)
    console.print(f"resuming from {source} at step {state['step']} ({state['tokens_seen']:,} tokens read)", soft_wrap=True)
    return state


def run_train(cfg: DictConfig, run_dir: Path, console: Console | None = None) -> dict:
    """Train as ``cfg`` says and write everything into ``run_dir``; returns the summary."""
    console = console or Console()
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "checkpoints" / "final").exists() or (run_dir / "summary.json").exists():
        if cfg.trainer.resume == "auto" and (run_dir / "summary.json").exists():
            return finished_run(cfg, run_dir, console)
        raise ClpdError(f"{run_dir} already holds a finished run; choose another hydra.run.dir")
    with recorded_status(run_dir):  # a refused config is recorded as a failed run too (for reports)
        tc: TrainConfig = to_object(cfg)  # every schema check runs here, before any work
        resume_from = resume_source(tc, run_dir)
        if tc.trainer.tensorboard:
            require_tensorboard()
        started = time.perf_counter()
        if tc.trainer.num_threads:
            torch.set_num_threads(tc.trainer.num_threads)
        device = resolve_device(tc.trainer.device)
        autocast_dtype = resolve_precision(tc.trainer.precision, device)
        tokenizer = load_tokenizer(tc.student)

        needs_teachers = tc.teachers.ladder and (tc.teachers.build_only or tc.distill.loss != DistillLoss.sft
                                                 or Difficulty.teacher_loss in scorers(tc.curriculum))
        teacher_specs, ladder_rows = prepare_teachers(tc, tokenizer, console) if needs_teachers else ([], [])
        if ladder_rows:
            write_json(run_dir / "teachers.json", ladder_rows)
            console.print(_ladder_table(ladder_rows))
        if tc.teachers.build_only:
            summary = {"teachers": ladder_rows, "wall_time_s": round(time.perf_counter() - started, 2)}
            write_json(run_dir / "summary.json", summary)
            return summary

        problems = load_problems(tc.benchmark, tc.benchmark.train_split, tc.benchmark.train_limit)
        if not problems:
            raise ClpdError(f"benchmark={tc.benchmark.name.value} split {tc.benchmark.train_split} has no problems")
        problems, examples, overlong = encode_problems(problems, tokenizer, tc.benchmark.chat_template,
                                                       tc.trainer.max_length, tc.trainer.overlong.value)

        torch.manual_seed(tc.seed)  # from-scratch weights and LoRA init are a function of the seed
        lora = tc.student.lora.enabled
        # With LoRA the frozen base can sit in the autocast dtype (bf16 on CUDA); the adapters stay fp32.
        model = load_model(tc.student, tokenizer, dtype=(autocast_dtype or torch.float32) if lora else torch.float32)
        scratch_base = copy.deepcopy(model) if lora and tc.student.path is None else None
        if lora:
            model = apply_lora(model, tc.student.lora)
        log.info("student %s: %.2fM parameters (%.2fM trainable); %d training problems from %s; device %s, %s",
                 tc.student.name, count_parameters(model) / 1e6, count_parameters(model, True) / 1e6, len(examples),
                 tc.benchmark.name.value, device, autocast_dtype or torch.float32)

        loss_fn, teachers, schedule = sft_loss, None, None
        if tc.distill.loss != DistillLoss.sft:
            d = tc.distill
            # Only the rows that the tokenizer, the student and every teacher share are compared.
            loss_fn = functools.partial(distill_loss_sum, loss=d.loss.value, alpha=d.alpha, temperature=d.temperature,
                                        beta=d.beta, lam=d.skew_lambda, chunk_size=d.chunk_size,
                                        vocab_size=len(tokenizer))
            teachers = TeacherPool(teacher_specs, tokenizer, device=device, dtype=teacher_dtype(autocast_dtype))
            schedule = make_schedule(tc.teachers, stage_starts(tc, len(examples)))

        sampler, scores = curriculum_sampler(tc, problems, examples, student=model, teacher_specs=teacher_specs,
                                             tokenizer=tokenizer, device=device, run_dir=run_dir, console=console)
        in_use = teacher_specs if teachers is not None else []
        manifest = make_manifest(cfg, teachers=[{"name": t.name, "source": t.path} for t in in_use],
                                 data=fingerprint(examples), scores=scores)
        resume = resume_student(tc, resume_from, manifest, model, run_dir, console) if resume_from else None

        checkpoints = run_dir / "checkpoints"
        saves: List[dict] = []

        def save(step: int, state: dict) -> Path:
            path = checkpoints / step_name(step)
            seconds = write_checkpoint(path, model=model, tokenizer=tokenizer, cfg=cfg, base=scratch_base, state=state,
                                       manifest=manifest, metrics=run_dir / "metrics.jsonl")
            prune_checkpoints(checkpoints, tc.trainer.keep_last)
            saves.append({"step": step, "seconds": round(seconds, 3)})
            console.print(f"step {step}: checkpoint {path} ({seconds:.2f}s)", soft_wrap=True)
            return path
        curve = None
        if tc.trainer.eval_every:
            curve_problems = load_problems(tc.benchmark, tc.benchmark.eval_split, tc.trainer.eval_every_limit)

            def curve(student):
                return score_problems(tc, student, tokenizer, curve_problems, device, autocast_dtype, console=None)[1]
        result = train(model, examples, sampler, tc.trainer, pad_id=tokenizer.pad_token_id, device=device,
                       autocast_dtype=autocast_dtype, metrics_path=run_dir / "metrics.jsonl", console=console,
                       loss_fn=loss_fn, teachers=teachers, schedule=schedule, evaluate=curve,
                       save=save if tc.trainer.save else None, resume=resume)
        if teachers is not None:
            teachers.release()

        checkpoint = checkpoints / FINAL
        if tc.trainer.save:
            seconds = write_checkpoint(checkpoint, model=model, tokenizer=tokenizer, cfg=cfg, base=scratch_base,
                                       state=result.state, manifest=manifest, metrics=run_dir / "metrics.jsonl")
            saves.append({"step": result.steps, "seconds": round(seconds, 3), "final": True})
        final_eval = None
        if tc.trainer.eval_at_end:
            final_eval = evaluate_final(tc, model, tokenizer, device, autocast_dtype, run_dir, console)
            student_row = {"name": f"student {tc.student.name}", "parameters": count_parameters(model),
                           "accuracy_strict": final_eval["accuracy_strict"], "by_difficulty": final_eval["by_difficulty"]}
            console.print(_ladder_table([*ladder_rows, student_row],
                                        f"{tc.benchmark.name.value}/{tc.benchmark.eval_split}: teachers and the student"))
        if tc.trainer.save and lora and tc.student.lora.merge_on_save:  # last: merging rewrites the model
            write_checkpoint(checkpoints / "merged", model=model.merge_and_unload(), tokenizer=tokenizer, cfg=cfg)
        summary = {
            "steps": result.steps, "final_loss": result.final_loss, "tokens_seen": result.tokens_seen,
            "answer_tokens_seen": result.answer_tokens_seen, "train_time_s": round(result.wall_time_s, 2),
            "wall_time_s": round(time.perf_counter() - started, 2), "student_parameters": count_parameters(model),
            "train_examples": len(examples), "overlong_examples": overlong, "skipped_steps": result.skipped_steps,
            "teacher_switches": result.teacher_switches, "resumed_from": resume and resume["checkpoint"],
            "checkpoint_saves": saves,
            "environment": environment(device),
            "checkpoint": str(checkpoint) if tc.trainer.save else None,
            "eval": final_eval,
        }
        write_json(run_dir / "summary.json", summary)
        console.print(f"[bold green]done[/] {result.steps} steps in {result.wall_time_s:.0f}s, final loss "
                      f"{result.final_loss:.4f}; run dir {run_dir}", soft_wrap=True)
    return summary


@hydra.main(version_base="1.3", config_path="pkg://clpd.conf", config_name="train")
def main(cfg: DictConfig) -> dict:
    return run_command("train", run_train, cfg)
