"""What stored teacher outputs (``distill.teacher_outputs=stored``, clpd.teachers.store) cost and save.

Six subcommands; each prints a table, and with ``--json PATH`` writes the numbers:

* ``step``: one optimizer step, SFT vs live KD vs stored KD (the teacher's top ``--top-k``) through
  clpd's ``optimizer_step`` on the loop's micro-batches, in rounds (every arm once, order rotated).
  Per arm: median s/step, min-max, tokens/s, ratio to SFT, CPU per wall second, the cores the rest
  of the machine used (above 0: a busy machine). ``--preset arith``: micro student, arith_plateau's large
  teacher, 32 arith problems; ``qwen``: Qwen2.5-shaped random models, random tokens. ``--device cuda``
  adds the peak allocated memory; ``--precision bf16`` is how clpd trains there.
* ``size``: bytes per answer token of real stores for k in ``--ks`` against full fp16 logits, the
  compact row's bits / 8 (clpd.teachers.compact; plus the offsets and the .npy headers) and format
  1's k * 8 + 4.
* ``build``: the time to write a store (examples/s, answer positions/s) and to open (verify) it.
* ``memory``: peak RSS of the logits, the KD loss and its backward alone, naive vs clpd live vs clpd
  stored, each in its own process: RSS on the CPU, not GPU memory (glibc keeps some freed memory).
* ``largest`` (a GPU): the largest micro-batch each ``step`` arm fits in memory, its peak and tokens/s.
* ``onpolicy``: on-policy steps (the student samples, the teacher scores, the student trains):
  samples/s and how a step's time splits into generation, teacher and the rest.

Run each measurement alone on the machine; beside other work use ``--threads 1`` (two threads on
two cores, one busy, wait for each other: steps 30-50x slower). scripts/device_check.sh runs
``step``, ``onpolicy`` and ``largest`` on a GPU (Qwen2.5 0.5B <- 1.5B and <- 7B shapes, bf16)::

    python -m clpd.bench.store step --preset arith --json /tmp/bench_store_step_arith.json  # ~2 min
    python -m clpd.bench.store step --preset qwen --json /tmp/bench_store_step_qwen.json    # ~5-8 min, ~17 GB RSS
    python -m clpd.bench.store size --json /tmp/bench_store_size.json                       # ~20 s
    python -m clpd.bench.store build --json /tmp/bench_store_build.json                     # ~2-3 min
    python -m clpd.bench.store memory --json /tmp/bench_store_memory.json                   # ~2 min, naive ~17 GB
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from clpd.bench.common import QWEN_HIDDEN, QWEN_TOKENIZER, QWEN_VOCAB, parse_shape
from clpd.bench.on_policy_step import ON_POLICY_ARMS, cmd_on_policy
from clpd.bench.store_build import BUILD_BATCH, cmd_build, cmd_size
from clpd.bench.store_largest import cmd_largest
from clpd.bench.store_memory import DEFAULT_VARIANTS, VARIANTS, cmd_memory
from clpd.bench.store_step import ARMS, STEP_DEFAULTS, cmd_step
from clpd.config.schema import DistillConfig

SHAPE = "PRESET|h,l,heads,kv,ffn,vocab"
DEFAULTS = argparse.ArgumentDefaultsHelpFormatter


def common(q: argparse.ArgumentParser) -> None:
    q.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the numbers as JSON here")


def placed(q: argparse.ArgumentParser) -> None:
    q.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the models run (cuda: built directly on the GPU, steps fenced by synchronize)")
    q.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 (--device cuda only): the teacher's weights bf16, the student's fp32 under bf16 "
                        "autocast, the store built under it, as clpd trains on CUDA")


def qwen_examples(parser: argparse.ArgumentParser, *, seq_len: int) -> None:
    """The qwen preset's random examples and teacher shape (``step`` and ``build``)."""
    parser.add_argument("--seq-len", type=int, default=seq_len, help="qwen: tokens per example")
    parser.add_argument("--answer-fraction", type=float, default=0.5, help="qwen: the answer's share of each example")
    parser.add_argument("--teacher", type=parse_shape, default=None, metavar=SHAPE,
                        help="qwen: the teacher's shape (default qwen2.5-1.5b; qwen2.5-7b on a GPU)")
    parser.add_argument("--tokenizer-size", type=int, default=None,
                        help=f"qwen: rows compared, kept in a store's top-k and ids are drawn from (default: "
                             f"min({QWEN_TOKENIZER}, the models' rows))")


def add_step(sub) -> None:
    s = sub.add_parser("step", help="one optimizer step: SFT vs live KD vs stored KD, interleaved",
                       formatter_class=DEFAULTS)
    s.add_argument("--preset", choices=sorted(STEP_DEFAULTS), default="arith")
    s.add_argument("--rounds", type=int, default=None, help="rounds (default: arith 5, qwen 3)")
    s.add_argument("--steps", type=int, default=None, help="timed steps per arm and round (default: arith 20, qwen 2)")
    s.add_argument("--warmup", type=int, default=None, help="untimed steps first in every arm run (default 1)")
    s.add_argument("--batch-size", type=int, default=None, help="examples per step (default: arith 32, qwen 2)")
    s.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default: arith 4, qwen 1)")
    s.add_argument("--lr", type=float, default=None, help="AdamW's lr (default: arith 5e-3, qwen 1e-5)")
    s.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms (*_fused: trainer.fused_loss)")
    s.add_argument("--top-k", type=int, default=32, help="logits kept per answer position in the store")
    s.add_argument("--store-batch-size", type=int, default=64, help="examples per teacher forward building the store")
    s.add_argument("--train-limit", type=int, default=None, help="arith: draw the batch from the first N problems")
    s.add_argument("--student", type=parse_shape, default=None, metavar=SHAPE,
                   help="qwen: the student's shape (default qwen2.5-0.5b)")
    qwen_examples(s, seq_len=128)
    placed(s)
    common(s)
    s.set_defaults(func=cmd_step)


def add_size(sub) -> None:
    z = sub.add_parser("size", help="bytes per answer token of a store vs full fp16 logits", formatter_class=DEFAULTS)
    z.add_argument("--ks", default="8,32,128", help="comma-separated k")
    z.add_argument("--vocab", type=int, default=QWEN_VOCAB, help="output rows (all of them compared)")
    z.add_argument("--examples", type=int, default=48)
    z.add_argument("--seq-len", type=int, default=64, help="tokens per example, the second half answer")
    z.add_argument("--store-batch-size", type=int, default=8)
    common(z)
    z.set_defaults(func=cmd_size)


def add_build(sub) -> None:
    b = sub.add_parser("build", help="time to build a store: arith's training set, or random examples for a Qwen shape",
                       formatter_class=DEFAULTS)
    b.add_argument("--preset", choices=sorted(BUILD_BATCH), default="arith")
    b.add_argument("--top-k", type=int, default=32)
    b.add_argument("--batch-size", type=int, default=None,
                   help=f"examples per teacher forward (default: {', '.join(f'{k} {v}' for k, v in BUILD_BATCH.items())})")
    b.add_argument("--train-limit", type=int, default=None, help="arith: the first N problems (default: all 20,000)")
    b.add_argument("--examples", type=int, default=512, help="qwen: random examples the store holds")
    qwen_examples(b, seq_len=512)
    placed(b)
    common(b)
    b.set_defaults(func=cmd_build)


def add_memory(sub) -> None:
    m = sub.add_parser("memory", help="peak RSS of logits + KD loss: naive vs clpd live vs clpd stored, unfused and fused",
                       formatter_class=DEFAULTS)
    m.add_argument("--tokens", type=int, default=4096, help="positions per micro-batch")
    m.add_argument("--answer-fraction", type=float, default=0.5)
    m.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    m.add_argument("--hidden", type=int, default=QWEN_HIDDEN)
    m.add_argument("--top-k", type=int, default=32)
    m.add_argument("--chunk-size", type=int, default=DistillConfig.chunk_size, help="the loss's chunk (distill.chunk_size)")
    m.add_argument("--slice-size", type=int, default=16384,
                   help="vocabulary rows per slice of the sliced_* variants (distill.vocab_slice_size)")
    m.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    m.add_argument("--force", action="store_true", help="run a variant even when it looks larger than MemAvailable")
    m.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)  # the child's own run
    common(m)
    m.set_defaults(func=cmd_memory)


def qwen_pair(parser: argparse.ArgumentParser, *, seq_len: int) -> None:
    """A Qwen-shaped random student and teacher trained a few steps (``largest``, ``onpolicy``)."""
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--student", type=parse_shape, default=None, metavar=SHAPE, help="default qwen2.5-0.5b")
    qwen_examples(parser, seq_len=seq_len)
    placed(parser)
    common(parser)


def add_largest(sub) -> None:
    g = sub.add_parser("largest", help="GPU: the largest micro-batch each arm's step fits, its peak and tokens/s",
                       formatter_class=DEFAULTS)
    g.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms (*_fused: trainer.fused_loss)")
    g.add_argument("--start", type=int, default=8, help="the first micro-batch tried (examples)")
    g.add_argument("--max-batch", type=int, default=256, help="the largest tried; the store covers this many examples")
    g.add_argument("--refine", type=int, default=2, help="halvings of the gap between fit and out of memory")
    g.add_argument("--top-k", type=int, default=32)
    g.add_argument("--store-batch-size", type=int, default=16)
    qwen_pair(g, seq_len=512)
    g.set_defaults(func=cmd_largest)


def add_on_policy(sub) -> None:
    o = sub.add_parser("onpolicy", help="on-policy steps (sample, teacher, train): samples/s and the step's split",
                       formatter_class=DEFAULTS)
    o.add_argument("--arms", default=",".join(ON_POLICY_ARMS), help="comma-separated arms (*_fused: trainer.fused_loss)")
    o.add_argument("--rounds", type=int, default=2)
    o.add_argument("--steps", type=int, default=2, help="timed steps per arm and round")
    o.add_argument("--warmup", type=int, default=1)
    o.add_argument("--batch-size", type=int, default=32, help="prompts per step, each answered by the student")
    o.add_argument("--grad-accum", type=int, default=4, help="micro-batches of samples per step")
    o.add_argument("--max-new-tokens", type=int, default=128, help="the sampling budget (distill.generation)")
    qwen_pair(o, seq_len=256)
    o.set_defaults(func=cmd_on_policy)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clpd.bench.store", description=__doc__.split("\n\n")[0],
                                formatter_class=DEFAULTS)
    sub = p.add_subparsers(dest="subcommand", required=True)
    for add in (add_step, add_size, add_build, add_memory, add_largest, add_on_policy):
        add(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
