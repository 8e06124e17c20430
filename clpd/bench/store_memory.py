"""``python -m clpd.bench.store memory``: peak memory of the logits and the KD loss alone, naive vs
clpd with a live teacher vs clpd with a stored top-k (and clpd's SFT step, ``*_sft``), each unfused
(the output layer, then the loss) and fused (``fused_*``: the output layer inside the loss,
clpd.losses.fused; ``sliced_*``: fused, each row chunk in vocabulary slices), each variant in its own fresh process (this command again, ``memory --variant
X``); the peak RSS over the RSS right before the variant ran."""

from __future__ import annotations

import argparse
import functools
import gc
import json
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from clpd.bench.common import machine, report_args, set_threads, write_report
from clpd.environment import max_rss_mib, mem_available_mib, peak_rss_mib, reset_peak_rss
from clpd.data.records import IGNORE_INDEX
from clpd.losses.sparse import TopK, top_k_outputs
from clpd.losses.distill import distill_loss
from clpd.losses.fused import HeadRows

VARIANTS = ("naive", "clpd_live", "clpd_stored", "fused_live", "fused_stored", "clpd_sft", "fused_sft", "sliced_live",
            "sliced_sft")
DEFAULT_VARIANTS = VARIANTS[:7]  # the sliced ones by name (--variants): three passes over a 152k-row matrix take minutes

# Peak over the RSS before, in fp32 [rows, V] matrices (rows: every position for naive, the answer
# positions for clpd), as measured at small sizes (V=20,000, 1,024 positions: 7.2, 10.4, 6.1), rounded up.
PEAK_MATRICES = {"naive": 8, "clpd_live": 11, "clpd_stored": 7, "fused_live": 2, "fused_stored": 2, "clpd_sft": 5,
                 "fused_sft": 2, "sliced_live": 2, "sliced_sft": 2}


def memory_inputs(tokens: int, answer_fraction: float, vocab: int, hidden: int, top_k: Optional[int], seed: int,
                  chunk: int = 128) -> dict:
    """Random hidden states and output matrices of student and teacher, the targets (prompt first,
    then answer), and for the stored variant the teacher's TopK at the answer rows (computed
    ``chunk`` rows at a time, so building it does not raise the peak above what follows)."""
    g = torch.Generator().manual_seed(seed)
    scale = hidden ** -0.5 * 4  # logits of standard deviation ~4: peaked distributions
    inputs = {"h_s": torch.randn(tokens, hidden, generator=g), "h_t": torch.randn(tokens, hidden, generator=g),
              "w_s": torch.randn(vocab, hidden, generator=g).mul_(scale),
              "w_t": torch.randn(vocab, hidden, generator=g).mul_(scale)}
    targets = torch.full((tokens,), IGNORE_INDEX, dtype=torch.long)
    prompt = tokens - max(1, round(tokens * answer_fraction))
    targets[prompt:] = torch.randint(0, vocab, (tokens - prompt,), generator=g)
    inputs["targets"] = targets
    if top_k is not None:
        answers = inputs["h_t"][targets != IGNORE_INDEX]
        parts = [top_k_outputs(rows @ inputs["w_t"].T, top_k, vocab) for rows in answers.split(chunk)]
        inputs["top_k"] = TopK(*(torch.cat(p) for p in zip(*parts)))
    return inputs


def naive_kd(h_s, h_t, w_s, w_t, targets, **_) -> torch.Tensor:
    """Full-vocabulary fp32 logits of both at every position, log_softmax, forward KL masked to the
    answer positions (what a from-scratch KD loop without clpd's care does)."""
    student = h_s @ w_s.T
    with torch.no_grad():
        teacher = h_t @ w_t.T
    s_logp = F.log_softmax(student.float(), dim=-1)
    t_logp = F.log_softmax(teacher.float(), dim=-1)
    per_token = F.kl_div(s_logp, t_logp, reduction="none", log_target=True).sum(-1)
    answer = targets != IGNORE_INDEX
    loss = (per_token * answer).sum() / answer.sum()
    loss.backward()
    return loss.detach()


def clpd_kd(h_s, h_t, w_s, w_t, targets, *, top_k=None, chunk_size: int, sft: bool = False, **_) -> torch.Tensor:
    """clpd's loop: logits at answer rows only (``logits_to_keep``), the teacher's under
    ``no_grad`` (or its stored TopK), chunked ``distill_loss``, logits freed before backward;
    ``sft``: cross-entropy on the gold tokens, no teacher."""
    keep = targets != IGNORE_INDEX
    if sft:
        teacher = None
    elif top_k is None:
        with torch.no_grad():  # as the loop runs its teacher
            teacher = h_t[keep] @ w_t.T
    else:
        teacher = top_k
    return _backward(h_s[keep] @ w_s.T, teacher, targets[keep], sft, chunk_size, w_s.size(0))


def fused_kd(h_s, h_t, w_s, w_t, targets, *, top_k=None, chunk_size: int, sft: bool = False,
             slice_size: Optional[int] = None, **_) -> torch.Tensor:
    """:func:`clpd_kd` with the output layers inside the loss (``trainer.fused_loss``): the answer
    rows' hidden states and the output matrices go in, chunks of logits are made and dropped
    (``slice_size``: each chunk ``slice_size`` vocabulary rows at a time)."""
    keep = targets != IGNORE_INDEX
    teacher = None if sft else HeadRows(h_t[keep], w_t) if top_k is None else top_k
    return _backward(HeadRows(h_s[keep], w_s), teacher, targets[keep], sft, chunk_size, w_s.size(0), slice_size)


def _backward(student, teacher, targets, sft: bool, chunk_size: int, width: int,
              slice_size: Optional[int] = None) -> torch.Tensor:
    """Forward KL (or CE) per answer token, its backward; the student's outputs freed first."""
    knobs = dict(loss="sft", alpha=1.0) if sft else dict(loss="forward_kl", alpha=0.0)
    parts = distill_loss(student, teacher, targets, chunk_size=chunk_size, vocab_size=width, slice_size=slice_size,
                         **knobs)
    loss = parts.total / targets.numel()
    del student, teacher, parts
    loss.backward()
    return loss.detach()


def estimate_mib(variant: str, tokens: int, answer: int, vocab: int, hidden: int) -> float:
    """What a variant's process needs at most: its inputs, ~0.5 GiB of Python and torch, its peak."""
    rows = tokens if variant == "naive" else answer
    return (2 * vocab * hidden * 4 + PEAK_MATRICES[variant] * rows * vocab * 4) / 2**20 + 512


def memory_variant(args: argparse.Namespace) -> dict:
    """Child: one variant, measured alone in this process."""
    threads = set_threads(args.threads)
    kd = {"naive": naive_kd, "clpd": clpd_kd, "fused": fused_kd,
          "sliced": functools.partial(fused_kd, slice_size=args.slice_size)}[args.variant.split("_")[0]]
    fn = kd if args.variant == "naive" else functools.partial(kd, chunk_size=args.chunk_size,
                                                                sft=args.variant.endswith("_sft"))
    stored = args.variant.endswith("_stored")
    # The same code once on tiny inputs first: what a first call costs once per process (lazy imports
    # such as the checkpoint's, kernel and thread-pool setup: ~80 MiB) is not the loss's memory.
    warm = memory_inputs(16, 0.5, 2 * args.top_k, 32, args.top_k if stored else None, args.seed)
    warm["h_s"].requires_grad_(True)
    fn(**warm)
    inputs = memory_inputs(args.tokens, args.answer_fraction, args.vocab, args.hidden,
                           args.top_k if stored else None, args.seed)
    inputs["h_s"].requires_grad_(True)
    del warm
    gc.collect()
    before = peak_rss_mib("VmRSS")
    reset = reset_peak_rss()
    peak_before = max_rss_mib()
    start = time.perf_counter()
    loss = fn(**inputs)
    seconds = time.perf_counter() - start
    peak = max_rss_mib()
    assert inputs["h_s"].grad is not None and inputs["h_s"].grad.shape == inputs["h_s"].shape
    return {"variant": args.variant, "rss_before_mib": before, "peak_rss_mib": peak, "peak_mib": peak - before,
            "peak_reset": reset, "peak_before_variant_mib": peak_before, "seconds": seconds, "loss": float(loss),
            "threads": threads}


def in_own_process(variant: str, args: argparse.Namespace) -> dict:
    """``python -m clpd.bench.store memory --variant VARIANT`` with this run's sizes: its result line."""
    command = [sys.executable, "-m", "clpd.bench.store", "memory", "--variant", variant,
               "--tokens", str(args.tokens), "--answer-fraction", str(args.answer_fraction),
               "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--top-k", str(args.top_k),
               "--chunk-size", str(args.chunk_size), "--slice-size", str(args.slice_size), "--seed", str(args.seed)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        return {"variant": variant, "error": f"exit status {out.returncode}: {out.stderr.strip()[-500:]}"}
    return json.loads(lines[-1][len("RESULT "):])


def run_variants(args: argparse.Namespace, variants: List[str], n_answer: int) -> Dict[str, dict]:
    """Each variant in its own process, skipped where it looks larger than the memory available."""
    results = {}
    for variant in variants:
        need, free = estimate_mib(variant, args.tokens, n_answer, args.vocab, args.hidden), mem_available_mib()
        if free is not None and need > free and not args.force:
            results[variant] = {"variant": variant, "error": f"skipped: needs about {need:,.0f} MiB, {free:,.0f} MiB "
                                                             f"available (--force runs it anyway)"}
            print(f"{variant}: {results[variant]['error']}", flush=True)
            continue
        r = results[variant] = in_own_process(variant, args)
        if "error" in r:
            print(f"{variant}: FAILED ({r['error']})", flush=True)
        else:
            print(f"{variant:<12} {r['peak_mib']:>9,.0f} MiB  ({r['seconds']:.2f}s)", flush=True)
    naive = results.get("naive", {}).get("peak_mib")
    for r in results.values():
        if "peak_mib" in r and naive:
            r["ratio_to_naive"] = r["peak_mib"] / naive
    return results


def memory_table(results: Dict[str, dict]) -> None:
    head = f"{'variant':<12} {'peak MiB':>10} {'x naive':>8} {'rss before':>11} {'seconds':>8} {'loss':>9}"
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<12} {'skipped' if r['error'].startswith('skipped') else 'failed':>10}")
            continue
        ratio = f"{r['ratio_to_naive']:.3f}" if "ratio_to_naive" in r else "-"
        print(f"{name:<12} {r['peak_mib']:>10,.0f} {ratio:>8} {r['rss_before_mib']:>8,.0f} MiB {r['seconds']:>8.2f} "
              f"{r['loss']:>9.4f}")
    if not all(r.get("peak_reset", True) for r in results.values()):
        print("note: the peak could not be reset before a variant (no /proc/self/clear_refs): its peak includes "
              "building its inputs")


def cmd_memory(args: argparse.Namespace) -> int:
    if args.variant is not None:
        print("RESULT " + json.dumps(memory_variant(args)), flush=True)
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise SystemExit(f"clpd.bench.store memory: --variants from {', '.join(VARIANTS)}, got {args.variants}")
    n_answer = max(1, round(args.tokens * args.answer_fraction))
    full = args.tokens * args.vocab * 4 / 2**20
    print(f"memory: logits + forward-KL loss + backward at V={args.vocab:,}, {args.tokens:,} positions "
          f"({n_answer:,} answer), hidden {args.hidden}; peak RSS on the CPU over the RSS before, each variant "
          f"in its own process; one fp32 [positions, V] is {full:,.0f} MiB, [answer, V] "
          f"{n_answer * args.vocab * 4 / 2**20:,.0f} MiB", flush=True)
    results = run_variants(args, variants, n_answer)
    memory_table(results)
    set_threads(args.threads)
    write_report(args.json, {"subcommand": "memory", "command": sys.argv, "environment": machine(),
                             "args": report_args(args),
                             "full_logits_mib": full, "answer_positions": n_answer, "variants": results})
    return 0 if all("error" not in r for r in results.values()) else 1
