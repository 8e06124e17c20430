"""Speed and memory of one distillation configuration, on random weights and random tokens.

Builds a student and a teacher from scratch as Qwen2 models (``Qwen2Config`` + ``from_config``:
random weights, nothing is downloaded), runs ``--warmup`` untimed and ``--steps`` timed distillation
steps and prints tokens/s, the split of a step into its phases, peak memory and the parameter
counts; ``--json PATH`` writes the same numbers as one JSON object. The step is written out here
with clpd's loss (not clpd's loop), one micro-batch as the loop does it::

    teacher forward (eval, inference_mode)  ->  student forward (autocast)  ->  loss
    ->  del both logits  ->  backward  ->  optimizer step

Both logits are freed before backward: kept alive they would sit on top of the backward's peak (the
[B, T, V] logits are the largest activations with a 152k vocabulary). On CUDA every phase is fenced
by synchronize, so a phase's time is its own GPU work.

    python -m clpd.bench.distill --student tiny --teacher tiny-teacher --steps 3 --warmup 1 --batch 4 --seq-len 64
    python -m clpd.bench.distill --student qwen2.5-0.5b --teacher qwen2.5-7b --precision bf16 --json out.json
    python -m clpd.bench.distill --student 256,4,4,2,768,1000 --teacher 384,6,6,2,1024,1024
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from clpd.bench.common import PRESETS, Placement, build_model, parse_shape, write_report
from clpd.environment import cpu_name, max_rss_mib
from clpd.data.records import IGNORE_INDEX
from clpd.losses.divergences import LOSS_NAMES
from clpd.losses.distill import distill_loss
from clpd.models.load import count_parameters

PHASES = ("teacher_forward", "student_forward", "loss", "backward", "optimizer_step")


class PhaseTimer:
    """Wall time per named phase; on CUDA each phase is fenced by synchronize(), so the time is
    the GPU work of that phase (at the cost of losing the overlap between phases)."""

    def __init__(self, where: Placement):
        self.where = where
        self.totals: Dict[str, float] = {}

    def run(self, name: str, fn: Callable, record: bool):
        self.where.sync()
        start = time.perf_counter()
        result = fn()
        self.where.sync()
        if record:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
        return result


def make_batch(batch: int, seq_len: int, token_range: int, answer_fraction: float, device: torch.device,
               generator: torch.Generator):
    """Random tokens; the first (1 - answer_fraction) of every row is 'prompt' (targets -100), the
    rest 'answer'. Targets are the next token, already shifted, as the loop's collate makes them."""
    ids = torch.randint(0, token_range, (batch, seq_len + 1), generator=generator)
    targets = ids[:, 1:].clone()
    prompt = seq_len - round(seq_len * answer_fraction)
    targets[:, :prompt] = IGNORE_INDEX
    return ids[:, :-1].to(device), torch.ones(batch, seq_len, dtype=torch.long, device=device), targets.to(device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clpd.bench.distill",
        description="Speed and memory of one distillation configuration (random-weight Qwen2 student and teacher, "
                    "random tokens; nothing is downloaded).",
        epilog=f"Presets: {', '.join(f'{k} ({v.describe()})' for k, v in PRESETS.items())}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student", type=parse_shape, default="tiny", metavar="PRESET|h,l,heads,kv,ffn,vocab",
                   help="student shape: a preset or six integers h,l,heads,kv,ffn,vocab (tied embeddings)")
    p.add_argument("--teacher", type=parse_shape, default="tiny-teacher",
                   metavar="PRESET|h,l,heads,kv,ffn,vocab", help="teacher shape, as --student")
    p.add_argument("--tokenizer-size", type=int, default=None,
                   help="vocabulary rows the KD loss compares and tokens are drawn from (default: min of the two "
                        "models' rows; the Qwen2.5 tokenizer has 151665)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 on CUDA, fp32 on CPU. bf16: teacher weights in bf16, student fp32 master "
                        "weights under bf16 autocast")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--loss", choices=LOSS_NAMES, default="forward_kl")
    p.add_argument("--alpha", type=float, default=0.0, help="weight of the CE term")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--chunk-size", type=int, default=1024, help="rows per checkpointed chunk of the KD loss")
    p.add_argument("--answer-fraction", type=float, default=0.5,
                   help="fraction of positions that carry a target (the rest is -100, like a prompt)")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation (gradient) checkpointing in the student")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the numbers as JSON here")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    problems = []
    for name in ("batch", "seq_len", "steps", "chunk_size"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        problems.append(f"--warmup must be >= 0, got {args.warmup}")
    if not 0.0 < args.answer_fraction <= 1.0:
        problems.append(f"--answer-fraction must be in (0, 1], got {args.answer_fraction}")
    if not 0.0 <= args.alpha <= 1.0:
        problems.append(f"--alpha must be in [0, 1], got {args.alpha}")
    if not args.temperature > 0:
        problems.append(f"--temperature must be > 0, got {args.temperature}")
    rows = min(args.student.vocab, args.teacher.vocab)
    if args.tokenizer_size is not None and not 1 <= args.tokenizer_size <= rows:
        problems.append(f"--tokenizer-size must be in [1, {rows}] (the models' shared rows), got {args.tokenizer_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda but torch sees no CUDA device")
    if problems:
        p.error("; ".join(problems))


def placement(args: argparse.Namespace) -> Placement:
    """``--device``/``--precision`` with ``auto`` resolved: CUDA and bf16 where there is a GPU."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return Placement.of(device, precision)


@dataclass
class Run:
    """The models, the optimizer and the timer of one benchmark run, and the losses of its steps."""
    args: argparse.Namespace
    where: Placement
    teacher: torch.nn.Module
    student: torch.nn.Module
    optimizer: torch.optim.Optimizer
    vocab_size: int
    timer: PhaseTimer
    generator: torch.Generator
    losses: List[float] = field(default_factory=list)

    def step(self, record: bool) -> None:
        """One distillation step, each phase timed (recorded when ``record``)."""
        a, run = self.args, self.timer.run
        autocast = self.where.autocast
        input_ids, attention_mask, targets = make_batch(a.batch, a.seq_len, self.vocab_size, a.answer_fraction,
                                                        self.where.device, self.generator)
        answer_tokens = max(int((targets != IGNORE_INDEX).sum()), 1)

        def teacher_forward():
            with torch.inference_mode(), autocast():
                return self.teacher(input_ids=input_ids, attention_mask=attention_mask).logits

        def student_forward():
            with autocast():
                return self.student(input_ids=input_ids, attention_mask=attention_mask).logits

        # Plain SFT (or alpha = 1) needs no teacher: the loop would not run one either.
        needs_teacher = a.loss != "sft" and a.alpha < 1.0
        teacher_logits = run("teacher_forward", teacher_forward if needs_teacher else lambda: None, record)
        student_logits = run("student_forward", student_forward, record)
        loss = run("loss", lambda s=student_logits, t=teacher_logits: distill_loss(
            s, t, targets, loss=a.loss, alpha=a.alpha, temperature=a.temperature, chunk_size=a.chunk_size,
            vocab_size=self.vocab_size).total / answer_tokens, record)
        del teacher_logits, student_logits  # free the [B, T, V] logits before backward: they peak its memory
        run("backward", loss.backward, record)

        def optimizer_step():
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        run("optimizer_step", optimizer_step, record)
        self.losses.append(float(loss.detach()))


def build_run(args: argparse.Namespace, where: Placement) -> tuple:
    """(Run, seconds to build the models, GiB allocated on the GPU before the steps or None)."""
    torch.manual_seed(args.seed)
    if where.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    teacher = build_model(args.teacher, where.teacher_dtype, where.device, args.seq_len).eval()
    teacher.requires_grad_(False)
    student = build_model(args.student, torch.float32, where.device, args.seq_len).train()
    if args.grad_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias until v6).
        enable = getattr(student, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, fused=where.cuda)
    build_s = time.perf_counter() - t0
    weights_gib = torch.cuda.memory_allocated() / 2**30 if where.cuda else None
    vocab_size = args.tokenizer_size or min(args.student.vocab, args.teacher.vocab)
    run = Run(args, where, teacher, student, optimizer, vocab_size, PhaseTimer(where),
              torch.Generator().manual_seed(args.seed))
    return run, build_s, weights_gib


def result_of(run: Run, build_s: float, elapsed: float, weights_gib: Optional[float]) -> dict:
    """The numbers of a finished run, as printed and written to ``--json``."""
    args, where = run.args, run.where
    step_ms = {name: 1000 * total / args.steps for name, total in run.timer.totals.items()}
    step_ms["student_forward_backward"] = step_ms["student_forward"] + step_ms["backward"]
    measured = sum(v for k, v in step_ms.items() if k != "student_forward_backward")
    result = {
        "device": str(where.device),
        "device_name": torch.cuda.get_device_name(where.device) if where.cuda else cpu_name(),
        "torch": torch.__version__, "precision": where.precision,
        "student_shape": asdict(args.student), "teacher_shape": asdict(args.teacher),
        "student_params": count_parameters(run.student), "teacher_params": count_parameters(run.teacher),
        "kd_vocab_size": run.vocab_size, "batch": args.batch, "seq_len": args.seq_len,
        "answer_fraction": args.answer_fraction, "loss": args.loss, "alpha": args.alpha,
        "temperature": args.temperature, "chunk_size": args.chunk_size, "grad_checkpointing": args.grad_checkpointing,
        "steps": args.steps, "warmup": args.warmup, "build_s": round(build_s, 3), "timed_s": round(elapsed, 4),
        "tokens_per_s": round(args.batch * args.seq_len * args.steps / elapsed, 1),
        "step_ms": {k: round(v, 3) for k, v in step_ms.items()},
        "step_pct": {k: round(100 * v / measured, 1) for k, v in step_ms.items() if k != "student_forward_backward"},
        "first_loss": run.losses[0], "last_loss": run.losses[-1],
        "peak_rss_gib": round(max_rss_mib() / 1024, 3),
    }
    if where.cuda:
        result["weights_gib_before_steps"] = round(weights_gib, 3)  # AdamW allocates its state at the first step
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return result


def print_result(args: argparse.Namespace, r: dict, elapsed: float) -> None:
    step_ms, tokens_per_step = r["step_ms"], args.batch * args.seq_len
    measured = sum(step_ms[name] for name in PHASES)
    print(f"config   device={r['device']} ({r['device_name']})  precision={r['precision']}  torch={r['torch']}")
    print(f"         student {args.student.describe()}  teacher {args.teacher.describe()}")
    print(f"         batch={args.batch}  seq_len={args.seq_len}  answer_fraction={args.answer_fraction}  "
          f"loss={args.loss}  alpha={args.alpha}  T={args.temperature}  chunk={args.chunk_size}  "
          f"kd_vocab={r['kd_vocab_size']}  grad_ckpt={args.grad_checkpointing}  steps={args.steps} (+{args.warmup} warmup)")
    print(f"params   student {r['student_params']:,}  teacher {r['teacher_params']:,}  (built in {r['build_s']:.1f}s)")
    print(f"speed    {r['tokens_per_s']:,.1f} tokens/s  ({1000 * elapsed / args.steps:.1f} ms/step, "
          f"{tokens_per_step:,} tokens/step)")
    for name in PHASES:
        print(f"  {name:<24}{step_ms[name]:>10.2f} ms  {r['step_pct'][name]:>5.1f}%")
    print(f"  {'student_forward_backward':<24}{step_ms['student_forward_backward']:>10.2f} ms  "
          f"{100 * step_ms['student_forward_backward'] / measured:>5.1f}%  (backward includes the loss's backward)")
    if "peak_allocated_gib" in r:
        print(f"memory   peak allocated {r['peak_allocated_gib']:.2f} GiB  reserved {r['peak_reserved_gib']:.2f} GiB"
              f"  (weights before the steps {r['weights_gib_before_steps']:.2f} GiB)"
              f"  peak RSS {r['peak_rss_gib']:.2f} GiB")
    else:
        print(f"memory   peak RSS {r['peak_rss_gib']:.3f} GiB")
    print(f"loss     first {r['first_loss']:.4f}  last {r['last_loss']:.4f} (per answer token)")


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    run, build_s, weights_gib = build_run(args, placement(args))
    for _ in range(args.warmup):
        run.step(record=False)
    start = time.perf_counter()
    for _ in range(args.steps):
        run.step(record=True)
    run.where.sync()
    elapsed = time.perf_counter() - start
    result = result_of(run, build_s, elapsed, weights_gib)
    print_result(args, result, elapsed)
    write_report(args.json, result, indent=2, label="wrote   ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
