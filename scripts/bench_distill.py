#!/usr/bin/env python
"""Speed and memory of one distillation configuration, on random weights and random tokens.

Builds a student and a teacher from scratch as Qwen2 models (``Qwen2Config`` +
``AutoModelForCausalLM.from_config``: random weights, nothing is ever downloaded), runs
``--warmup`` untimed and ``--steps`` timed distillation steps and prints tokens/s, the split of a
step into its phases, peak memory and the parameter counts. ``--json PATH`` writes the same numbers
as one JSON object.

It imports only ``clpd.losses`` from clpd (plus torch and transformers), so it keeps working while
the training loop changes. One step is what the loop does for one micro-batch:

    teacher forward (eval, inference_mode)  ->  student forward (autocast)  ->  loss
    ->  del both logits  ->  backward  ->  optimizer step

The teacher and student logits are freed before backward: kept alive they would sit on top of the
backward's peak (the [B, T, V] logits are the largest activations with a 152k vocabulary).

Examples::

    python scripts/bench_distill.py --student tiny --teacher tiny-teacher --steps 3 --warmup 1 --batch 4 --seq-len 64
    python scripts/bench_distill.py --student qwen2.5-0.5b --teacher qwen2.5-7b --precision bf16 --json out.json
    python scripts/bench_distill.py --student 256,4,4,2,768,1000 --teacher 384,6,6,2,1024,1024
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

# Runnable as `python scripts/bench_distill.py` from a checkout that is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clpd.data.records import IGNORE_INDEX
from clpd.losses.divergences import LOSS_NAMES
from clpd.losses.distill import distill_loss


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int  # output rows (embedding rows), not the tokenizer's size
    tied: bool = True

    def describe(self) -> str:
        return (f"h{self.hidden} l{self.layers} heads{self.heads} kv{self.kv_heads} ffn{self.ffn} "
                f"vocab{self.vocab} {'tied' if self.tied else 'untied'}")


# Qwen2.5 shapes (with random weights); 0.5B-3B have 151936 output rows, 7B has 152064.
PRESETS: Dict[str, Shape] = {
    "qwen2.5-0.5b": Shape(896, 24, 14, 2, 4864, 151936, tied=True),
    "qwen2.5-1.5b": Shape(1536, 28, 12, 2, 8960, 151936, tied=True),
    "qwen2.5-3b": Shape(2048, 36, 16, 2, 11008, 151936, tied=True),
    "qwen2.5-7b": Shape(3584, 28, 28, 4, 18944, 152064, tied=False),
    "tiny": Shape(128, 4, 4, 4, 384, 100, tied=True),
    "tiny-teacher": Shape(128, 5, 4, 4, 384, 100, tied=True),
}


def parse_shape(text: str) -> Shape:
    """A preset name or ``h,l,heads,kv,ffn,vocab`` (tied embeddings)."""
    if text in PRESETS:
        return PRESETS[text]
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 6 or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a preset ({', '.join(PRESETS)}) nor six positive integers h,l,heads,kv,ffn,vocab")
    hidden, layers, heads, kv, ffn, vocab = values
    if hidden % heads or heads % kv:
        raise argparse.ArgumentTypeError(
            f"{text!r}: hidden ({hidden}) must divide by heads ({heads}) and heads by kv ({kv})")
    return Shape(hidden, layers, heads, kv, ffn, vocab, tied=True)


def build_model(shape: Shape, dtype: torch.dtype, device: torch.device, seq_len: int):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, intermediate_size=shape.ffn,
        max_position_embeddings=max(seq_len, 32768), tie_word_embeddings=shape.tied, use_cache=False,
    )
    # Built directly on the device: random init of a 7B model on the CPU takes minutes.
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        except TypeError:  # transformers < 4.56 calls it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype, attn_implementation="sdpa")
    return model.to(device)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied matrix once


class PhaseTimer:
    """Wall time per named phase; on CUDA each phase is fenced by synchronize(), so the time is
    the GPU work of that phase (at the cost of losing the overlap between phases)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: Dict[str, float] = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, name: str, fn: Callable, record: bool):
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        if record:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
        return result


def peak_rss_gib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


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


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    teacher_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    vocab_size = args.tokenizer_size or min(args.student.vocab, args.teacher.vocab)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()
    teacher = build_model(args.teacher, teacher_dtype, device, args.seq_len).eval()
    teacher.requires_grad_(False)
    student = build_model(args.student, torch.float32, device, args.seq_len).train()
    if args.grad_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias until v6).
        enable = getattr(student, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr, fused=device.type == "cuda")
    build_s = time.perf_counter() - t0
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None

    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    generator = torch.Generator().manual_seed(args.seed)
    timer = PhaseTimer(device)
    tokens_per_step = args.batch * args.seq_len
    losses = []
    needs_teacher = args.loss != "sft" and args.alpha < 1.0

    def step(record: bool) -> None:
        input_ids, attention_mask, targets = make_batch(args.batch, args.seq_len, vocab_size, args.answer_fraction,
                                                        device, generator)
        answer_tokens = max(int((targets != IGNORE_INDEX).sum()), 1)

        def teacher_forward():
            with torch.inference_mode(), autocast:
                return teacher(input_ids=input_ids, attention_mask=attention_mask).logits

        def student_forward():
            with autocast:
                return student(input_ids=input_ids, attention_mask=attention_mask).logits

        # Plain SFT (or alpha = 1) needs no teacher: the loop would not run one either.
        teacher_logits = timer.run("teacher_forward", teacher_forward if needs_teacher else lambda: None, record)
        student_logits = timer.run("student_forward", student_forward, record)
        loss = timer.run("loss", lambda s=student_logits, t=teacher_logits: distill_loss(
            s, t, targets, loss=args.loss, alpha=args.alpha, temperature=args.temperature,
            chunk_size=args.chunk_size, vocab_size=vocab_size).total / answer_tokens, record)
        del teacher_logits, student_logits  # free the [B, T, V] logits before backward: they peak its memory
        timer.run("backward", loss.backward, record)

        def optimizer_step():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        timer.run("optimizer_step", optimizer_step, record)
        losses.append(float(loss.detach()))

    for _ in range(args.warmup):
        step(record=False)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(record=True)
    timer.sync()
    elapsed = time.perf_counter() - start

    step_ms = {name: 1000 * total / args.steps for name, total in timer.totals.items()}
    step_ms["student_forward_backward"] = step_ms["student_forward"] + step_ms["backward"]
    measured = sum(v for k, v in step_ms.items() if k != "student_forward_backward")
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "precision": precision,
        "student_shape": asdict(args.student),
        "teacher_shape": asdict(args.teacher),
        "student_params": count_parameters(student),
        "teacher_params": count_parameters(teacher),
        "kd_vocab_size": vocab_size,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "answer_fraction": args.answer_fraction,
        "loss": args.loss,
        "alpha": args.alpha,
        "temperature": args.temperature,
        "chunk_size": args.chunk_size,
        "grad_checkpointing": args.grad_checkpointing,
        "steps": args.steps,
        "warmup": args.warmup,
        "build_s": round(build_s, 3),
        "timed_s": round(elapsed, 4),
        "tokens_per_s": round(tokens_per_step * args.steps / elapsed, 1),
        "step_ms": {k: round(v, 3) for k, v in step_ms.items()},
        "step_pct": {k: round(100 * v / measured, 1) for k, v in step_ms.items() if k != "student_forward_backward"},
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "peak_rss_gib": round(peak_rss_gib(), 3),
    }
    if device.type == "cuda":
        result["weights_gib_before_steps"] = round(weights_gib, 3)  # AdamW allocates its state at the first step
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)

    print(f"config   device={device} ({result['device_name']})  precision={precision}  torch={torch.__version__}")
    print(f"         student {args.student.describe()}  teacher {args.teacher.describe()}")
    print(f"         batch={args.batch}  seq_len={args.seq_len}  answer_fraction={args.answer_fraction}  "
          f"loss={args.loss}  alpha={args.alpha}  T={args.temperature}  chunk={args.chunk_size}  kd_vocab={vocab_size}"
          f"  grad_ckpt={args.grad_checkpointing}  steps={args.steps} (+{args.warmup} warmup)")
    print(f"params   student {result['student_params']:,}  teacher {result['teacher_params']:,}  (built in {build_s:.1f}s)")
    print(f"speed    {result['tokens_per_s']:,.1f} tokens/s  ({1000 * elapsed / args.steps:.1f} ms/step, "
          f"{tokens_per_step:,} tokens/step)")
    for name in ("teacher_forward", "student_forward", "loss", "backward", "optimizer_step"):
        print(f"  {name:<24}{step_ms[name]:>10.2f} ms  {result['step_pct'][name]:>5.1f}%")
    print(f"  {'student_forward_backward':<24}{step_ms['student_forward_backward']:>10.2f} ms  "
          f"{100 * step_ms['student_forward_backward'] / measured:>5.1f}%  (backward includes the loss's backward)")
    if device.type == "cuda":
        print(f"memory   peak allocated {result['peak_allocated_gib']:.2f} GiB  reserved {result['peak_reserved_gib']:.2f} GiB"
              f"  (weights before the steps {result['weights_gib_before_steps']:.2f} GiB)"
              f"  peak RSS {result['peak_rss_gib']:.2f} GiB")
    else:
        print(f"memory   peak RSS {result['peak_rss_gib']:.3f} GiB")
    print(f"loss     first {losses[0]:.4f}  last {losses[-1]:.4f} (per answer token)")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote    {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
