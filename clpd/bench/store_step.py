"""``python -m clpd.bench.store step``: one optimizer step, SFT vs live KD vs stored KD, each with the
output layer fused with the loss or not (``trainer.fused_loss``; arms ``*_fused``), interleaved in one
run, each arm through clpd's own ``optimizer_step`` on the same micro-batches from the same initial
student."""

from __future__ import annotations

import argparse
import functools
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import torch

from clpd.bench.common import (PRESETS, QWEN_TOKENIZER, Placement, clock, load_shares, machine, qwen_model,
                               report_args, rounds, set_threads, summarize, write_report)
from clpd.bench.store_build import (arith_examples, arith_spec, bench_key, placement, random_examples,
                                    write_bench_store)
from clpd.losses.distill import distill_loss

ARMS = ("sft", "live", "stored", "sft_fused", "live_fused", "stored_fused")
STEP_DEFAULTS = {
    "arith": {"batch_size": 32, "grad_accum": 4, "rounds": 5, "steps": 20, "warmup": 1, "lr": 5e-3},
    "qwen": {"batch_size": 2, "grad_accum": 1, "rounds": 3, "steps": 2, "warmup": 1, "lr": 1e-5},
}


@dataclass
class Workload:
    """What every arm of ``step`` trains on: the batch (the training set of this benchmark, indexed
    as the store is), its micro-batches, the student (reloaded from its initial weights before every
    arm's run) and the teacher."""
    examples: List[dict]
    step: object  # clpd.training.batches.StepBatch
    student: torch.nn.Module
    teacher: torch.nn.Module
    width: int  # vocabulary rows KD compares
    max_length: int
    pad_id: int
    describe: dict
    where: Placement


def save_initial(model: torch.nn.Module, path: Path):
    """``model``'s weights, saved to be reloaded before each arm. On the CPU: a file, memory-mapped
    when reloaded (the page cache), so a Qwen-sized copy does not stay in this process's RSS beside
    the models. On a GPU: a copy in pinned host memory, so it takes no device memory (the peak per arm
    is the arm's own) and reloads at PCIe speed."""
    if next(model.parameters()).device.type == "cpu":
        torch.save(model.state_dict(), path)
        return path
    return {k: v.detach().to("cpu", copy=True).pin_memory() for k, v in model.state_dict().items()}


def reload(model: torch.nn.Module, initial) -> None:
    state = torch.load(initial, mmap=True, weights_only=True) if isinstance(initial, Path) else initial
    model.load_state_dict(state)


def step_models(args: argparse.Namespace, where: Placement) -> tuple:
    """(batch, student, teacher, pad id, KD width, max length, shapes, data) of ``--preset``."""
    from clpd.curriculum.sampler import Sampler
    from clpd.models.load import load_model

    if args.preset == "arith":
        examples, tokenizer, max_length = arith_examples(args.train_limit)
        pick = Sampler(range(len(examples)), args.batch_size, seed=args.seed).batch(0)
        batch = [examples[i] for i in pick]
        torch.manual_seed(args.seed)
        student = load_model(arith_spec("student"), tokenizer).to(where.device)
        torch.manual_seed(args.seed + 1)
        teacher = load_model(arith_spec("teacher"), tokenizer, dtype=where.teacher_dtype).to(where.device)
        shapes = {"student": "conf/student/micro.yaml", "teacher": "conf/teachers/arith_plateau.yaml: large"}
        data = (f"{len(batch)} arith training problems (Sampler(range({len(examples)}), {args.batch_size}, "
                f"seed={args.seed}).batch(0))")
        return batch, student, teacher, tokenizer.pad_token_id, len(tokenizer), max_length, shapes, data
    width = args.tokenizer_size or min(args.student.vocab, args.teacher.vocab, QWEN_TOKENIZER)
    batch = random_examples(args.batch_size, args.seq_len, args.answer_fraction, width, args.seed)
    student = qwen_model(args.student, args.seq_len, args.seed, torch.float32, where.device)
    teacher = qwen_model(args.teacher, args.seq_len, args.seed + 1, where.teacher_dtype, where.device)
    shapes = {"student": args.student.describe(), "teacher": args.teacher.describe()}
    data = (f"{len(batch)} random examples of {args.seq_len} tokens, the last {args.answer_fraction:.0%} answer, "
            f"ids < {width}")
    return batch, student, teacher, 0, width, args.seq_len, shapes, data


def step_workload(args: argparse.Namespace, where: Placement) -> Workload:
    from clpd.curriculum.sampler import Sampler
    from clpd.models.load import count_parameters
    from clpd.training.batches import Batches

    batch, student, teacher, pad_id, width, max_length, shapes, data = step_models(args, where)
    teacher.eval().requires_grad_(False)
    student.train()
    # The loop's own batching: the batch sorted by length, cut into grad_accum micro-batches, each
    # with the indices of its examples ("index") into ``batch``, the training set the store covers.
    step = Batches(batch, Sampler(range(len(batch)), len(batch), seed=args.seed), pad_id).step(
        0, 0, len(batch) // args.grad_accum)
    describe = {"preset": args.preset, **shapes, "data": data, "student_params": count_parameters(student),
                "teacher_params": count_parameters(teacher), "kd_width": width, "batch_size": len(batch),
                "micro_batches": len(step.micro_batches), "tokens_per_step": step.tokens,
                "positions_per_step": step.positions, "answer_tokens_per_step": step.answer_tokens,
                "device": str(where.device), "precision": where.precision,
                "weights_gib": where.allocated_gib()}  # both models on the GPU (None on the CPU)
    return Workload(batch, step, student, teacher, width, max_length, pad_id, describe, where)


def build_bench_store(work: Workload, top_k: int, batch_size: int, folder: Path, what: dict) -> tuple:
    """The store of ``work.teacher`` over ``work.examples`` in ``folder``, built on the workload's
    device under its autocast: (TeacherStore, numbers)."""
    from clpd.teachers.store import TeacherStore, store_bytes

    where = work.where
    key = bench_key(what, top_k, work.width, work.max_length, str(where.teacher_dtype).removeprefix("torch."))
    where.reset_peak()
    start = time.perf_counter()
    marker = write_bench_store(folder, work.teacher, work.examples, key, pad_id=work.pad_id, batch_size=batch_size,
                               where=where)
    where.sync()
    built = time.perf_counter() - start
    start = time.perf_counter()
    store = TeacherStore(folder, key)
    opened = time.perf_counter() - start
    return store, {"top_k": top_k, "examples": len(work.examples), "rows": marker["rows"], "build_s": built,
                   "open_s": opened, "bytes": store_bytes(folder), "peak_allocated_gib": where.peak_gib()}


def run_arm(work: Workload, arm: str, store, initial, args: argparse.Namespace) -> dict:
    """One arm's run: the student reset to its initial weights, a fresh AdamW (fused on CUDA, as
    clpd.training.loop.train builds it), ``--warmup`` untimed and ``--steps`` timed optimizer steps through
    ``clpd.training.step.optimizer_step`` under the workload's autocast. On CUDA each step is fenced by
    ``torch.cuda.synchronize()`` and the peak allocated memory of the run (both models' weights,
    AdamW's state, activations, logits, loss) is read after resetting it at the run's start."""
    from clpd.config.schema import TrainerConfig
    from clpd.teachers.live import LiveTeacher
    from clpd.training.step import build_optimizer, optimizer_step, sft_loss

    where = work.where
    reload(work.student, initial)
    gc.collect()
    where.reset_peak()
    before = where.allocated_gib()
    cfg = TrainerConfig(lr=args.lr, grad_accum=args.grad_accum, batch_size=args.batch_size)
    optimizer = build_optimizer(work.student, cfg, fused=where.cuda)
    scaler = torch.amp.GradScaler(where.device.type, enabled=False)  # bf16 and fp32 need no loss scaling
    kd = functools.partial(distill_loss, loss="forward_kl", alpha=0.0, vocab_size=work.width)
    base, fused = arm.removesuffix("_fused"), arm.endswith("_fused")
    loss_fn, teacher = {"sft": (sft_loss, None), "live": (kd, LiveTeacher(work.teacher, fused=fused)),
                        "stored": (kd, store)}[base]
    step = functools.partial(optimizer_step, work.student, optimizer, scaler, work.step.micro_batches,
                             answer_tokens=work.step.answer_tokens, loss_fn=loss_fn, teacher=teacher,
                             autocast=where.autocast(), grad_clip=cfg.grad_clip, fused=fused)
    step_s, losses, applied, start = [], [], 0, None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            start = clock()
        where.sync()
        t0 = time.perf_counter()
        result = step()
        where.sync()
        seconds = time.perf_counter() - t0
        losses.append(result.loss)
        if i >= args.warmup:
            step_s.append(seconds)
            applied += result.applied
    shares = load_shares(start, clock())
    peak = where.peak_gib()
    del optimizer, step
    gc.collect()
    out = {"step_s": step_s, "mean_step_s": statistics.fmean(step_s), "losses": losses, "applied": applied, **shares}
    if peak is not None:
        out.update(peak_allocated_gib=peak, allocated_before_gib=before)
    return out


def summarize_arms(runs: Dict[str, List[dict]], tokens_per_step: int) -> Dict[str, dict]:
    """Per arm: median over rounds of the round's mean s/step, min-max, tokens/s; and each arm's
    ratio to SFT (of the medians, and per round)."""
    out = {}
    for arm, arm_rounds in runs.items():
        s = summarize([r["mean_step_s"] for r in arm_rounds])
        out[arm] = {"median_step_s": s["median"], "min_step_s": s["min"], "max_step_s": s["max"],
                    "tokens_per_s": tokens_per_step / s["median"], "rounds": len(arm_rounds),
                    "cpu_per_wall": statistics.median(r["cpu_per_wall"] for r in arm_rounds),
                    "max_others_cores": max(r["others_cores"] for r in arm_rounds),
                    "first_loss": arm_rounds[0]["losses"][0], "steps_applied": sum(r["applied"] for r in arm_rounds),
                    "steps_timed": sum(len(r["step_s"]) for r in arm_rounds)}
        if all("peak_allocated_gib" in r for r in arm_rounds):
            out[arm]["peak_allocated_gib"] = max(r["peak_allocated_gib"] for r in arm_rounds)
    if "sft" in out:
        for arm in out:
            out[arm]["ratio_to_sft"] = out[arm]["median_step_s"] / out["sft"]["median_step_s"]
            out[arm]["round_ratios_to_sft"] = [a["mean_step_s"] / b["mean_step_s"]
                                               for a, b in zip(runs[arm], runs["sft"])]
    return out


def step_table(summary: Dict[str, dict]) -> str:
    gpu = all("peak_allocated_gib" in s for s in summary.values())
    head = (f"{'arm':<12} {'s/step':>9} {'min-max over rounds':>21} {'tokens/s':>10} {'x SFT':>6} {'per round':>11} "
            f"{'cpu/wall':>8} {'others':>6} {'loss@1':>8}" + (f" {'peak GiB':>9}" if gpu else ""))
    lines = [head, "-" * len(head)]
    for arm, s in summary.items():
        ratios = s.get("round_ratios_to_sft") or []
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-"
        lines.append(f"{arm:<12} {s['median_step_s']:>9.4f} {s['min_step_s']:>10.4f}-{s['max_step_s']:<10.4f} "
                     f"{s['tokens_per_s']:>10,.0f} {s.get('ratio_to_sft', float('nan')):>5.2f}x {spread:>11} "
                     f"{s['cpu_per_wall']:>8.2f} {s['max_others_cores']:>6.2f} {s['first_loss']:>8.4f}"
                     + (f" {s['peak_allocated_gib']:>9.2f}" if gpu else ""))
    return "\n".join(lines)


def step_args(args: argparse.Namespace) -> None:
    """The preset's defaults filled in, every bound checked (all problems refused in one line)."""
    for name, value in STEP_DEFAULTS[args.preset].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.preset == "qwen":
        args.student = args.student or PRESETS["qwen2.5-0.5b"]
        args.teacher = args.teacher or PRESETS["qwen2.5-1.5b"]
    check_run_args(args, "step", ARMS, ("steps", "rounds", "batch_size", "grad_accum", "top_k"))


def check_run_args(args: argparse.Namespace, command: str, arms: tuple, positive: tuple) -> None:
    """``--arms`` split and checked against ``arms``, each of ``positive`` >= 1, ``--warmup`` >= 0
    and the batch divisible into micro-batches: every problem refused in one line."""
    problems = [f"--{k.replace('_', '-')} must be >= 1" for k in positive if getattr(args, k) < 1]
    if args.warmup < 0:
        problems.append("--warmup must be >= 0")
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()] if isinstance(args.arms, str) else args.arms
    unknown = [a for a in args.arms if a not in arms]
    if unknown or not args.arms:
        problems.append(f"--arms from {', '.join(arms)}, got {unknown or 'none'}")
    if args.batch_size % args.grad_accum:
        problems.append(f"--batch-size {args.batch_size} must divide by --grad-accum {args.grad_accum}")
    if problems:
        raise SystemExit(f"clpd.bench.store {command}: " + "; ".join(problems))


def print_setup(args: argparse.Namespace, work: Workload, threads: int, prep_s: float) -> None:
    d, where = work.describe, work.where
    print(f"step: SFT vs live KD vs stored KD through clpd.training.step.optimizer_step; torch {torch.__version__}, "
          f"{threads} threads, {os.cpu_count()} CPUs; {where.describe()}", flush=True)
    weights = f"; weights on the GPU {d['weights_gib']:.2f} GiB" if where.cuda else ""
    print(f"student {d['student']} ({d['student_params'] / 1e6:.2f}M params), teacher {d['teacher']} "
          f"({d['teacher_params'] / 1e6:.2f}M), random weights, {where.precision}{weights}", flush=True)
    print(f"batch: {d['data']}; {d['micro_batches']} micro-batches, {d['tokens_per_step']:,} tokens "
          f"({d['answer_tokens_per_step']:,} answer) per step, KD over {d['kd_width']:,} rows; "
          f"{args.warmup} warm-up + {args.steps} timed steps per arm, {args.rounds} rounds; setup {prep_s:.1f}s",
          flush=True)


def run_rounds(args: argparse.Namespace, work: Workload, tmp: Path) -> tuple:
    """The store built once, then every arm once per round: (store numbers, runs per arm, seconds of arms)."""
    initial = save_initial(work.student, tmp / "student.pt")
    store, info = build_bench_store(work, args.top_k, args.store_batch_size, tmp / "store",
                                    {"preset": args.preset, "seed": args.seed})
    print(f"store: top-{args.top_k} of the teacher at {info['rows']:,} answer positions of {info['examples']} "
          f"examples, {info['bytes'] / 2**20:.2f} MiB, built in {info['build_s']:.2f}s (first forwards included), "
          f"opened (verified) in {info['open_s']:.3f}s"
          + (f", peak {info['peak_allocated_gib']:.2f} GiB" if work.where.cuda else ""), flush=True)
    runs: Dict[str, List[dict]] = {arm: [] for arm in args.arms}
    started = time.perf_counter()
    for r, order in rounds(args.rounds, args.arms):
        for arm in order:
            out = run_arm(work, arm, store, initial, args)
            runs[arm].append({"round": r, **out})
            peak = f"  peak {out['peak_allocated_gib']:.2f} GiB" if "peak_allocated_gib" in out else ""
            print(f"round {r + 1} {arm:<12} {out['mean_step_s']:.4f} s/step  cpu/wall {out['cpu_per_wall']:.2f}  "
                  f"others {out['others_cores']:.2f} cores  loss {out['losses'][0]:.4f} -> {out['losses'][-1]:.4f}"
                  f"{peak}", flush=True)
    return info, runs, time.perf_counter() - started


def print_summary(args: argparse.Namespace, summary: Dict[str, dict], where: Placement, wall: float) -> dict:
    """The table and the ratios (returned for the report)."""
    print(f"\nmedian over {args.rounds} rounds of each round's mean s/step; 'per round': the arm's s/step over "
          f"SFT's in the same round; 'others': the most CPU cores the rest of the machine used in a run; "
          f"loss@1: the first step's loss per answer token (stored <= live: the top-{args.top_k} + tail coarsening)"
          + ("; peak GiB: torch.cuda.max_memory_allocated over the arm's runs (both models' weights included), "
             "reset at each run's start" if where.cuda else ""))
    print(step_table(summary))
    pairs = [("live", "sft"), ("stored", "sft"), ("stored", "live")] + [(f"{a}_fused", a) for a in ("sft", "live", "stored")]
    ratios = {f"{a}/{b}": summary[a]["median_step_s"] / summary[b]["median_step_s"] for a, b in pairs
              if a in summary and b in summary}
    print("\n" + ", ".join(f"{pair} {ratio:.2f}x" for pair, ratio in ratios.items()) + f"; {wall:.0f}s of arms")
    unapplied = {arm: s["steps_timed"] - s["steps_applied"] for arm, s in summary.items()
                 if s["steps_applied"] < s["steps_timed"]}
    if unapplied:
        print(f"WARNING: steps not applied (non-finite loss; no optimizer update was timed): {unapplied}")
    return ratios


def cmd_step(args: argparse.Namespace) -> int:
    step_args(args)
    where = placement(args, "step")
    threads = set_threads(args.threads)
    t0 = time.perf_counter()
    work = step_workload(args, where)
    where.sync()
    prep_s = time.perf_counter() - t0
    if args.top_k > work.width:
        raise SystemExit(f"clpd.bench.store step: --top-k {args.top_k} exceeds the {work.width} vocabulary rows compared")
    print_setup(args, work, threads, prep_s)
    tmp = Path(tempfile.mkdtemp(prefix="bench_store_"))
    try:
        store_info, runs, wall = run_rounds(args, work, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize_arms(runs, work.describe["tokens_per_step"])
    ratios = print_summary(args, summary, where, wall)
    write_report(args.json, {
        "subcommand": "step", "command": sys.argv, "environment": machine(where), "args": report_args(args),
        "workload": work.describe, "setup_s": prep_s, "store": store_info, "summary": summary, "ratios": ratios,
        "runs": runs, "wall_s": wall})
    return 0
