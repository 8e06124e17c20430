"""clpd's training loop against TRL's GKDTrainer on the same work, in one run, interleaved.

Every arm (clpd.bench.trl_arms) trains the same random-weight student against the same teacher
(``--shapes arith``: the micro student and arith_plateau's large (0.87M) teacher; ``smollm2``:
SmolLM2-135M's shapes) from one saved copy of the weights, on the same arith examples: optimizer step
s trains on ``Sampler(range(n), batch, seed).batch(s)`` everywhere. The loss is forward KL(teacher ||
student) over answer tokens divided by the step's answer tokens (TRL: ``GKDConfig(lmbda=0, beta=0,
seq_kd=False)``, off-policy); AdamW, clipping and the constant lr are set alike. Every arm ends by
scoring one fixed probe batch (``probe_kd``): equal to float noise when the arms made the same updates.

Only the optimizer steps after ``--warmup`` are timed (clpd: from ``Batches.step`` of step ``warmup``
to ``train``'s return; TRL: between ``on_step_end`` callbacks). Prints, per arm, the median real
tokens/s over rounds (tokens that predict a next token), its min-max, the ratio to the best TRL arm,
padded positions/s and peak RSS; each arm runs in its own forked process, each round runs every arm
once in rotated order. A busy machine slows a 2-thread arm several times over, so every run records
its CPU per wall second and the cores the rest of the machine used; a run where others used more
than ``--max-others`` cores is repeated (``--retries``), the quietest kept, and each run first waits
up to ``--quiet-wait`` seconds for a quiet machine.

``--on-policy``: the on-policy arms instead (clpd.bench.gkd_arms): clpd with ``distill.on_policy=1``
against GKDTrainer with ``lmbda=1``, every example answered by the student's own sample (up to
``--max-new-tokens``, temperature 1.0, top_p 1.0, top_k 0), the generalized JSD with ``--beta`` on
the sampled tokens; it also prints sampled tokens/s and where each arm's steps went (generation,
teacher forward, student forward, optimizer step, the rest).

TRL is not a dependency of clpd: ``pip install trl`` for this benchmark only (check that torch and
transformers keep their versions). Timed runs under the shared lock (~10 minutes on 2 idle cores)::

    flock /tmp/clpd-measure.lock python -m clpd.bench.trl --out /tmp/bench_trl.json
    python -m clpd.bench.trl --steps 2 --rounds 1 --train-limit 200 --arms clpd_ga4,trl_ga4_sorted   # smoke test
    flock /tmp/clpd-measure.lock python -m clpd.bench.trl --shapes smollm2 --batch-size 16 --steps 4 \\
        --arms clpd_ga1,clpd_ga4,trl_ga1,trl_ga4_sorted,trl_ga4_rebalance   # SmolLM2-135M's shapes: ~20 min
    flock /tmp/clpd-measure.lock python -m clpd.bench.trl --on-policy --steps 8   # on-policy, arith: ~3 min
    flock /tmp/clpd-measure.lock python -m clpd.bench.trl --on-policy --shapes smollm2 --batch-size 8 \\
        --max-new-tokens 64 --steps 2 --arms clpd_onpolicy_ga1,trl_onpolicy_ga1   # ~6 min (and the ga4 pair)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from clpd.bench.common import in_child, provenance, rounds, versions, wait_quiet, write_report
from clpd.bench.gkd_arms import ON_POLICY_ARMS, on_policy_table, run_on_policy_arm, summarize_on_policy
from clpd.bench.clpd_arm import run_clpd
from clpd.bench.trl_arms import (ARMS as OFF_POLICY_ARMS, OPT_IN, SHAPES, Arm, Work, build_models, packing_support,
                                 preimport, run_arm, run_trl, trl_version, unavailable_reason)
from clpd.config.schema import BenchmarkConfig
from clpd.curriculum.sampler import Sampler
from clpd.data import load_problems
from clpd.data.prompts import encode_problems
from clpd.environment import cpu_name
from clpd.models.tokenizer import build_char_tokenizer

TRL_MISSING = ("TRL is not installed. It is not a dependency of clpd; install it into this environment for this "
               "benchmark only: pip install trl (then check that torch and transformers kept their versions, e.g. "
               "pip install trl -c <(pip freeze | grep -v '^-e'))")

ARMS = OFF_POLICY_ARMS + ON_POLICY_ARMS
ARM_NAMES = [a.name for a in ARMS]

# clpd arms and the TRL arm with the same micro-batch shapes
SAME_SHAPES = {"clpd_ga1": "trl_ga1", "clpd_ga4": "trl_ga4_sorted",
               "clpd_onpolicy_ga1": "trl_onpolicy_ga1", "clpd_onpolicy_ga4": "trl_onpolicy_ga4"}


# --- report ----------------------------------------------------------------------------------------

def summarize(results: Dict[str, List[dict]], arms: List[Arm]) -> Dict[str, dict]:
    summary = {}
    for arm in arms:
        runs = [r for r in results[arm.name] if "error" not in r]
        if not runs:
            continue
        tok = [r["real_tok_s"] for r in runs]
        summary[arm.name] = {
            "runs": len(runs), "median_real_tok_s": statistics.median(tok), "min_real_tok_s": min(tok),
            "max_real_tok_s": max(tok), "median_positions_s": statistics.median(r["positions_s"] for r in runs),
            "median_step_s": statistics.median(r["median_step_s"] for r in runs),
            "median_cpu_per_wall": statistics.median(r["cpu_per_wall"] for r in runs),
            "max_others_cores": max(r["others_cores"] for r in runs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "positions_per_real_token": runs[0]["padded_positions"] / runs[0]["real_tokens"],
            "micro_batches_per_step": statistics.mean(runs[0]["micro_batches"]),
            "probe_kd": runs[0]["probe_kd"],
            "store_build_s": runs[0].get("store_build_s"), "store_examples": runs[0].get("store_examples"),
        }
    trl = {k: v for k, v in summary.items() if k.startswith("trl_")}
    if trl:
        best = max(trl, key=lambda k: trl[k]["median_real_tok_s"])
        for name, s in summary.items():
            s["ratio_to_best_trl"] = s["median_real_tok_s"] / trl[best]["median_real_tok_s"]
            s["best_trl"] = best
            # Within each round (the arms ran minutes apart, not hours): drift in the machine's load
            # cancels more in these than in the ratio of medians.
            s["round_ratios_to_best_trl"] = paired_ratios(results[name], results[best])
            twin = SAME_SHAPES.get(name)
            if twin in summary:
                s["same_shapes_twin"] = twin
                s["ratio_to_twin"] = s["median_real_tok_s"] / summary[twin]["median_real_tok_s"]
                s["round_ratios_to_twin"] = paired_ratios(results[name], results[twin])
    return summary


def paired_ratios(runs: List[dict], other: List[dict]) -> List[float]:
    theirs = {r["round"]: r["real_tok_s"] for r in other if "error" not in r}
    return [r["real_tok_s"] / theirs[r["round"]] for r in runs if "error" not in r and r["round"] in theirs]


def table(summary: Dict[str, dict], arms: List[Arm]) -> str:
    head = (f"{'arm':<18} {'real tok/s':>10} {'min-max':>15} {'x best TRL':>10} {'per round':>11} {'pos/s':>9} "
            f"{'pos/tok':>7} {'step ms':>8} {'cpu/wall':>8} {'others':>6} {'peak RSS':>9} {'probe kd':>9}")
    lines = [head, "-" * len(head)]
    for arm in arms:
        s = summary.get(arm.name)
        if s is None:
            continue
        ratio = f"{s['ratio_to_best_trl']:.2f}x" if "ratio_to_best_trl" in s else "-"
        per_round = s.get("round_ratios_to_best_trl") or []
        spread = f"{min(per_round):.2f}-{max(per_round):.2f}" if per_round else "-"
        lines.append(f"{arm.name:<18} {s['median_real_tok_s']:>10,.0f} "
                     f"{s['min_real_tok_s']:>7,.0f}-{s['max_real_tok_s']:<7,.0f} {ratio:>10} {spread:>11} "
                     f"{s['median_positions_s']:>9,.0f} {s['positions_per_real_token']:>7.2f} "
                     f"{1000 * s['median_step_s']:>8.1f} {s['median_cpu_per_wall']:>8.2f} {s['max_others_cores']:>6.2f} "
                     f"{s['peak_rss_mib']:>6.0f} MiB {s['probe_kd']:>9.5f}")
    twins = [(name, s) for name, s in summary.items() if "ratio_to_twin" in s]
    if twins:
        lines.append("")
        lines.append("same shapes: " + "; ".join(
            f"{name} / {s['same_shapes_twin']} = {s['ratio_to_twin']:.2f}x (per round "
            f"{min(s['round_ratios_to_twin']):.2f}-{max(s['round_ratios_to_twin']):.2f})" for name, s in twins))
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clpd.bench.trl", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per arm and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first, in every arm (>= 1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every arm once, the order rotated")
    p.add_argument("--arms", default="default",
                   help=f"'default' (all of the mode's arms but {', '.join(OPT_IN)}), 'all' (the mode's), or "
                        f"comma-separated names from: {', '.join(ARM_NAMES)}")
    p.add_argument("--on-policy", action="store_true",
                   help="the on-policy mode: every example answered by the student's own sample (clpd on_policy=1, "
                        "TRL lmbda=1), the generalized JSD with --beta on the sampled tokens; its arms are "
                        f"{', '.join(a.name for a in ON_POLICY_ARMS)}")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="on-policy: a sample ends at eos or after this many tokens (distill.generation.max_new_tokens, "
                        "GKDConfig.max_new_tokens)")
    p.add_argument("--beta", type=float, default=0.5,
                   help="on-policy: the generalized JSD's beta (distill.beta, GKDConfig.beta); 0 is forward KL")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="arith",
                   help="the student's and teacher's shapes: arith (the default job's micro student and large "
                        "teacher, 100 rows) or smollm2 (SmolLM2-135M's config as the teacher, its 6-block cut as the "
                        "student, 49,152 rows)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step")
    p.add_argument("--micro-batch-tokens", type=int, default=512,
                   help="the token budget of the clpd_packed_tok arm (micro_batch_tokens); at least the longest example")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every arm")
    p.add_argument("--seed", type=int, default=0, help="the batches' draw and the models' initial weights")
    p.add_argument("--train-limit", type=int, default=None,
                   help="encode only the first N training problems (default: all 20000 of benchmark=arith)")
    p.add_argument("--max-others", type=float, default=0.25,
                   help="an arm's run during which the rest of the machine used more CPU cores than this (from "
                        "/proc/stat) is run again, up to --retries times; the quietest attempt is kept")
    p.add_argument("--retries", type=int, default=2, help="see --max-others (0: keep every first attempt)")
    p.add_argument("--quiet-wait", type=float, default=600,
                   help="before each run of an arm, wait up to this many seconds until the rest of the machine uses "
                        "at most --max-others cores (0: do not wait)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p


def chosen_arms(parser: argparse.ArgumentParser, args: argparse.Namespace) -> List[Arm]:
    """The arms of ``--arms``, every argument checked (all problems refused in one line)."""
    problems = [f"--{k.replace('_', '-')} must be >= 1" for k in ("steps", "rounds", "batch_size", "threads")
                if getattr(args, k) < 1]
    if args.retries < 0:
        problems.append("--retries must be >= 0")
    if args.warmup < 1:  # TRL's first step has no start mark (the clock is on_step_end)
        problems.append("--warmup must be >= 1")
    if args.max_new_tokens < 1 or not 0.0 <= args.beta <= 1.0:
        problems.append("--max-new-tokens must be >= 1 and --beta in [0, 1]")
    mode = [a.name for a in ARMS if a.on_policy == args.on_policy]  # one mode per run: the arms do the same work
    wanted = (mode if args.arms == "all" else [n for n in mode if n not in OPT_IN] if args.arms == "default"
              else [a.strip() for a in args.arms.split(",") if a.strip()])
    unknown = [a for a in wanted if a not in mode]
    if unknown:
        problems.append(f"--arms: {unknown} not among the {'on' if args.on_policy else 'off'}-policy arms "
                        f"({', '.join(mode)}){'' if args.on_policy else '; on-policy arms need --on-policy'}")
    arms = [a for a in ARMS if a.name in wanted]
    if any(args.batch_size % a.grad_accum for a in arms):
        problems.append(f"--batch-size {args.batch_size} must divide by every arm's grad_accum (4)")
    if problems:
        parser.error("; ".join(problems))
    return arms


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked arms: no tokenizer thread pool to inherit
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental (TRL >= 0.2x)
    parser = build_parser()
    args = parser.parse_args(argv)
    arms = chosen_arms(parser, args)
    trl_ok = trl_version() is not None
    if not trl_ok and any(a.kind == "trl" for a in arms):
        print(TRL_MISSING, file=sys.stderr)
        return 2
    preimport(trl_too=trl_ok and any(a.kind == "trl" for a in arms))
    support = packing_support()
    skipped = {a.name: why for a in arms if (why := unavailable_reason(a, support, trl_ok))}
    arms = [a for a in arms if a.name not in skipped]

    t0 = time.perf_counter()
    tokenizer = build_char_tokenizer()
    _, examples, counts = encode_problems(load_problems(BenchmarkConfig(), "train", args.train_limit), tokenizer,
                                          chat_template=False, max_len=512)
    sampler = Sampler(range(len(examples)), args.batch_size, seed=args.seed)
    step_batches = [sampler.batch(s) for s in range(args.warmup + args.steps)]
    probe = Sampler(range(len(examples)), 32, seed=args.seed + 1).batch(0)  # a fixed batch of another draw
    longest = max(len(e["input_ids"]) for e in examples)
    if any(a.micro_batch_tokens for a in arms) and args.micro_batch_tokens < longest:
        parser.error(f"--micro-batch-tokens {args.micro_batch_tokens} is smaller than the longest example "
                     f"({longest} tokens)")
    lengths = [len(examples[i]["input_ids"]) for batch in step_batches for i in batch]
    prep_s = time.perf_counter() - t0

    folder = Path(tempfile.mkdtemp(prefix="bench_trl_models_"))
    # The rows every arm's loss compares: all of the models' output rows, as TRL compares them.
    vocab = SHAPES[args.shapes][0].get("vocab_size") or len(tokenizer)
    work = Work(examples, step_batches, probe, tokenizer.pad_token_id, vocab, str(folder / "student"),
                str(folder / "teacher"), args)
    try:
        return measure(args, arms, skipped, support, work, prep_s, lengths, counts)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def quietest_run(args: argparse.Namespace, work: Work, arm: Arm, r: int) -> dict:
    """One arm's run in round ``r``, again while the rest of the machine took CPU from it: the quietest attempt."""
    attempts = []
    for attempt in range(args.retries + 1):
        waited, before = wait_quiet(args.max_others, args.quiet_wait) if args.quiet_wait > 0 else (0.0, None)
        if waited >= 5:
            print(f"round {r + 1} {arm.name:<18} waited {waited:.0f}s for a quiet machine (others now "
                  f"{before:.2f} cores)", flush=True)
        out = in_child(lambda: run_on_policy_arm(work, arm) if arm.on_policy else
                       run_arm(work, arm, run_clpd if arm.kind == "clpd" else run_trl))
        out.update(waited_s=waited, others_before=before)
        attempts.append(out)
        if "error" in out or out["others_cores"] <= args.max_others or attempt == args.retries:
            break
        print(f"round {r + 1} {arm.name:<18} others used {out['others_cores']:.2f} cores "
              f"(> --max-others {args.max_others}): {out['real_tok_s']:,.0f} real tok/s not kept, run again", flush=True)
    out = min(attempts, key=lambda o: o.get("others_cores", float("inf")))
    return {**out, "round": r, "attempts": len(attempts),
            "discarded": [{k: o.get(k) for k in ("real_tok_s", "others_cores", "error")} for o in attempts
                          if o is not out]}


def print_run(args: argparse.Namespace, arm: Arm, r: int, out: dict) -> None:
    if "error" in out:
        print(f"round {r + 1} {arm.name}: FAILED {out['error']}", flush=True)
        if os.environ.get("BENCH_TRL_DEBUG"):
            print(out.get("traceback", ""), file=sys.stderr)
        return
    sampled = f"{out['sampled_tok_s']:>7,.0f} sampled tok/s  " if "sampled_tok_s" in out else ""
    print(f"round {r + 1} {arm.name:<18} {sampled}{out['real_tok_s']:>9,.0f} real tok/s  {out['positions_s']:>9,.0f} "
          f"pos/s  step {1000 * out['median_step_s']:.1f} ms  peak {out['peak_rss_mib']:.0f} MiB  "
          f"probe {out['probe_kd']:.5f}  cpu/wall {out['cpu_per_wall']:.2f}  others "
          f"{out['others_cores']:.2f} cores{'  (BUSY)' if out['others_cores'] > args.max_others else ''}"
          + (f"  store of {out['store_examples']} examples built in {out['store_build_s']:.1f}s (untimed)"
             if out.get("store_build_s") is not None else ""), flush=True)


def print_header(args: argparse.Namespace, models: dict, n_examples: int, lengths: List[int], prep_s: float,
                 skipped: Dict[str, str]) -> None:
    print(f"clpd vs TRL {trl_version()} GKDTrainer, torch {torch.__version__}, transformers "
          f"{versions()['transformers']}, {cpu_name()}, {os.cpu_count()} CPUs, torch threads {args.threads} in every "
          "arm", flush=True)
    print(f"student {models['student_params'] / 1e6:.2f}M params, teacher {models['teacher_params'] / 1e6:.2f}M "
          f"({models['student_attn']} attention), fp32; {n_examples} arith examples, batch {args.batch_size}, "
          f"{args.warmup} warm-up + {args.steps} timed steps per arm, {args.rounds} rounds; example length "
          f"{min(lengths)}-{max(lengths)} (mean {statistics.mean(lengths):.0f}); data prep {prep_s:.1f}s", flush=True)
    if args.on_policy:
        print(f"on-policy: every example answered by the student (clpd on_policy=1, TRL lmbda=1), sampled with "
              f"temperature 1.0, top_p 1.0, top_k 0, up to {args.max_new_tokens} new tokens or eos; generalized JSD "
              f"beta={args.beta} on the sampled tokens", flush=True)
    for name, why in skipped.items():
        print(f"  skipped {name}: {why}", flush=True)


def measure(args: argparse.Namespace, arms: List[Arm], skipped: Dict[str, str], support: Dict[str, bool], work: Work,
            prep_s: float, lengths: List[int], counts: Dict[str, int]) -> int:
    models = in_child(lambda: build_models(work.student_dir, work.teacher_dir, args.seed, args.threads, args.shapes))
    if "error" in models:
        print(models.get("traceback", models["error"]), file=sys.stderr)
        return 1
    if models.get("packing_exact") is False:
        for a in [a for a in arms if a.packed]:
            skipped[a.name] = "packing_is_exact(student) is False: the attention does not keep packed examples apart"
        arms = [a for a in arms if not a.packed]
    print_header(args, models, len(work.examples), lengths, prep_s, skipped)

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM also ends the running arm (in_child)
    results: Dict[str, List[dict]] = {a.name: [] for a in arms}
    started = time.perf_counter()
    for r, order in rounds(args.rounds, arms):
        for arm in order:
            out = quietest_run(args, work, arm, r)
            results[arm.name].append(out)
            print_run(args, arm, r, out)
    wall = time.perf_counter() - started

    summary = summarize(results, arms)
    print("\nmedians over rounds; 'per round': the arm's tok/s over the best TRL arm's in the same round, min-max; "
          "'others': the most CPU cores the rest of the machine used during one of the arm's kept runs")
    print(table(summary, arms))
    trl = [k for k in summary if k.startswith("trl_")]
    clpd = [k for k in summary if k.startswith("clpd_")]
    on_policy = summarize_on_policy(results, arms, SAME_SHAPES) if args.on_policy else None
    if on_policy:
        print("\non-policy: sampled tokens (generated by the student, up to and with eos) per second of timed steps; "
              "'x twin': over the TRL arm of the same micro-batches; the split: seconds per step (median over rounds)")
        print(on_policy_table(on_policy, arms))
    if trl and clpd:
        best_clpd = max(clpd, key=lambda k: summary[k]["median_real_tok_s"])
        print(f"\nbest clpd arm {best_clpd}: {summary[best_clpd]['ratio_to_best_trl']:.2f}x the best TRL arm "
              f"({summary[best_clpd]['best_trl']}) in median real tokens/s; medians of {args.rounds} rounds, "
              f"{wall:.0f}s of arms")
    write_report(args.out, {
        "command": sys.argv, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "versions": {**versions(), "trl": trl_version()},
        "machine": {"cpus": os.cpu_count(), "processor": cpu_name()},
        "clpd": provenance(), "support": support, "models": models, "skipped": skipped,
        "arms": {a.name: dataclasses.asdict(a) for a in arms}, "summary": summary, "on_policy": on_policy,
        "runs": results, "wall_s": wall,
        "data": {"examples": len(work.examples), "dropped": counts["dropped"], "length_min": min(lengths),
                 "length_max": max(lengths), "length_mean": statistics.mean(lengths)}})
    return 1 if any("error" in r for runs in results.values() for r in runs) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the running arm was stopped with it
        print("interrupted", file=sys.stderr)
        sys.exit(130)
