"""``python -m clpd.bench.store largest``: on a GPU, the largest micro-batch (examples of ``--seq-len``
tokens) with which one optimizer step of each arm fits in memory, with that step's peak memory and
tokens/s.

Sizes double from ``--start`` until a step runs out of memory or ``--max-batch`` is reached; then the
gap between the last size that fit and the first that did not is halved ``--refine`` times. Each
trial is ``step``'s own arm run (clpd's ``optimizer_step``, a fresh AdamW, the student reloaded) with
one untimed and one timed step on one micro-batch: the first b examples of the ``--max-batch`` that
the store covers. Its peak is ``torch.cuda.max_memory_allocated`` over the trial, both models'
weights and AdamW's state included."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from clpd.bench.common import machine, report_args, write_report
from clpd.bench.store_build import placement
from clpd.bench.store_step import build_bench_store, run_arm, save_initial, step_args, step_workload, Workload


def trial(work: Workload, arm: str, store, initial, size: int, args: argparse.Namespace) -> Optional[dict]:
    """One step of ``arm`` on a micro-batch of ``size`` examples: its numbers, or None when it ran
    out of GPU memory (everything it held freed again)."""
    from clpd.curriculum.sampler import Sampler
    from clpd.training.batches import Batches

    step = Batches(work.examples[:size], Sampler(range(size), size, seed=args.seed), work.pad_id).step(0, 0, size)
    one = copy.copy(args)
    one.batch_size, one.grad_accum, one.warmup, one.steps = size, 1, 1, 1
    try:
        out = run_arm(dataclasses.replace(work, step=step), arm, store, initial, one)
    except torch.OutOfMemoryError:
        out = None  # the traceback (and the step's tensors it holds) is dropped at the end of this block
    for p in work.student.parameters():
        p.grad = None  # a failed step leaves gradients behind
    gc.collect()
    if work.where.cuda:
        torch.cuda.empty_cache()
    if out is None:
        return None
    return {"step_s": out["step_s"][0], "tokens_per_s": size * args.seq_len / out["step_s"][0],
            "peak_allocated_gib": out.get("peak_allocated_gib", float("nan"))}


def largest(work: Workload, arm: str, store, initial, args: argparse.Namespace) -> dict:
    """Doubling, then halving the gap: the largest size that fit, the smallest that did not."""
    tried: Dict[int, Optional[dict]] = {}

    def attempt(size: int) -> bool:
        tried[size] = trial(work, arm, store, initial, size, args)
        out = tried[size]
        said = (f"fits, {out['step_s']:.3f} s/step, {out['tokens_per_s']:,.0f} tokens/s, peak "
                f"{out['peak_allocated_gib']:.2f} GiB" if out else "out of memory")
        print(f"  {arm:<12} {size:>5} examples: {said}", flush=True)
        return out is not None

    fit, fail, size = None, None, args.start
    while size <= args.max_batch:
        if not attempt(size):
            fail = size
            break
        fit, size = size, size * 2
    for _ in range(args.refine):
        if fit is None or fail is None or fail - fit <= 1:
            break
        middle = (fit + fail) // 2
        fit, fail = (middle, fail) if attempt(middle) else (fit, middle)
    return {"largest": fit, "smallest_failed": fail, "at_largest": tried.get(fit), "tried": tried}


def cmd_largest(args: argparse.Namespace) -> int:
    args.preset = "qwen"
    args.batch_size, args.grad_accum, args.rounds, args.steps, args.warmup = args.max_batch, 1, 1, 1, 1
    step_args(args)
    where = placement(args, "largest")
    if not where.cuda:
        print("on the CPU no step runs out of GPU memory: every size up to --max-batch fits (a dry run)")
    t0 = time.perf_counter()
    work = step_workload(args, where)
    print(f"largest micro-batch: student {work.describe['student']}, teacher {work.describe['teacher']}, "
          f"{args.seq_len} tokens per example ({args.answer_fraction:.0%} answer), {where.describe()}; "
          f"weights {work.describe['weights_gib'] or 0:.2f} GiB; setup {time.perf_counter() - t0:.1f}s", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_largest_"))
    try:
        initial = save_initial(work.student, tmp / "student.pt")
        store, info = build_bench_store(work, args.top_k, args.store_batch_size, tmp / "store", {"seed": args.seed})
        results = {arm: largest(work, arm, store, initial, args) for arm in args.arms}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{'arm':<12} {'largest':>8} {'failed at':>9} {'peak GiB':>9} {'tokens/s':>10}")
    for arm, r in results.items():
        at = r["at_largest"] or {}
        print(f"{arm:<12} {r['largest'] or 0:>8} {r['smallest_failed'] or '-':>9} "
              f"{at.get('peak_allocated_gib', float('nan')):>9.2f} {at.get('tokens_per_s', float('nan')):>10,.0f}")
    write_report(args.json, {"subcommand": "largest", "command": sys.argv, "environment": machine(where),
                             "args": report_args(args), "workload": work.describe, "store": info, "results": results})
    return 0
