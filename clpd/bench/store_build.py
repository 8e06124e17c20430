"""``python -m clpd.bench.store size`` and ``build``: a store's bytes per answer token, and the time to
build and open one; with the teachers and examples every store subcommand builds its stores from."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from clpd.bench.common import (PRESETS, QWEN_TOKENIZER, Placement, Shape, clock, load_shares, machine, qwen_model,
                               set_threads, report_args, write_report)
from clpd.data.records import IGNORE_INDEX

BUILD_BATCH = {"arith": 64, "qwen": 16}  # default --batch-size: examples per teacher forward


# --- what the store subcommands build on -----------------------------------------------------------

def placement(args: argparse.Namespace, command: str) -> Placement:
    """``--device``/``--precision`` checked (each problem refused in one line) and resolved."""
    if args.precision == "bf16" and args.device != "cuda":
        raise SystemExit(f"clpd.bench.store {command}: --precision bf16 needs --device cuda (on a CPU clpd trains "
                         "and builds stores in fp32)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"clpd.bench.store {command}: --device cuda but torch {torch.__version__} sees no CUDA device")
    return Placement.of(torch.device(args.device), args.precision)


def quiet_console():
    from rich.console import Console

    return Console(quiet=True)


def bench_key(what: dict, top_k: int, width: int, max_length: int, dtype: str = "float32"):
    """A store key for a benchmark's own teacher (``store_key`` would hash saved weights)."""
    from clpd.teachers.store import StoreKey

    return StoreKey(teacher={"bench": json.dumps(what, sort_keys=True)}, data="bench", top_k=top_k, width=width,
                    max_length=max_length, dtype=dtype)


def arith_spec(which: str):
    """The ModelConfig of the micro student or of arith_plateau's ``large`` rung (0.87M), read from clpd's configs."""
    from omegaconf import OmegaConf

    from clpd.config.model import ModelConfig

    conf = files("clpd.conf")
    if which == "student":
        entry = OmegaConf.load(str(conf / "student" / "micro.yaml"))
    else:
        ladder = OmegaConf.load(str(conf / "teachers" / "arith_plateau.yaml")).ladder
        entry = next(rung for rung in ladder if rung.name == "large")
    fields = {k: v for k, v in OmegaConf.to_container(entry).items() if k in ModelConfig.__dataclass_fields__}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), fields))


def arith_examples(limit: Optional[int]) -> tuple:
    """(encoded arith training examples, tokenizer, max_length), as ``clpd train`` encodes them."""
    from clpd.config.schema import TrainConfig
    from clpd.data import load_problems
    from clpd.data.prompts import encode_problems
    from clpd.models.tokenizer import build_char_tokenizer

    tc = TrainConfig()
    tokenizer = build_char_tokenizer()
    _, examples, _ = encode_problems(load_problems(tc.benchmark, "train", limit), tokenizer,
                                     tc.benchmark.chat_template, tc.trainer.max_length, tc.trainer.overlong.value)
    return examples, tokenizer, tc.trainer.max_length


def random_examples(n: int, length: int, answer_fraction: float, vocab: int, seed: int) -> List[dict]:
    """``n`` encoded examples of ``length`` random token ids: the first (1 - answer_fraction) of each
    is prompt (labels -100), the rest answer (labels = input ids)."""
    g = torch.Generator().manual_seed(seed)
    prompt = length - max(1, round(length * answer_fraction))
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        out.append({"id": f"random-{i}", "input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def answer_positions(examples: Sequence[dict]) -> int:
    return sum(sum(1 for t in e["labels"][1:] if t != IGNORE_INDEX) for e in examples)


def write_bench_store(folder: Path, teacher, examples, key, *, pad_id: int, batch_size: int, where: Placement,
                      name: str = "bench") -> dict:
    """``write_store`` on the placement's device under its autocast, as clpd.teachers.store.build_store does."""
    from clpd.teachers.store import write_store

    return write_store(folder, teacher, examples, key, pad_id=pad_id, batch_size=batch_size, device=where.device,
                       autocast_dtype=where.autocast_dtype, console=quiet_console(), name=name)


# --- size ------------------------------------------------------------------------------------------

def formula_bytes(k: int, width: int) -> float:
    """Bytes per answer row of the compact format (clpd.teachers.compact): its bits over 8."""
    from clpd.teachers.compact import Layout

    return Layout(k, width).row_bits / 8


def npy_header_bytes(path: Path) -> int:
    """The .npy header's bytes: the file's size less its array's."""
    import numpy as np

    return path.stat().st_size - np.load(path, mmap_mode="r").nbytes


def size_of_store(folder: Path, k: int, model, examples: List[dict], args: argparse.Namespace, shape: Shape) -> dict:
    """One store of the top ``k``, written and measured against the formula and full fp16 logits."""
    from clpd.teachers.compact import Layout
    from clpd.teachers.store import store_bytes

    key = bench_key({"size": shape.describe(), "seed": args.seed}, k, args.vocab, args.seq_len)
    start = time.perf_counter()
    marker = write_bench_store(folder, model, examples, key, pad_id=0, batch_size=args.store_batch_size,
                               where=Placement.of(torch.device("cpu"), "fp32"), name="size")
    built = time.perf_counter() - start
    total = store_bytes(folder)
    file_bytes = {f: (folder / f).stat().st_size for f in marker["files"]}
    headers = sum(npy_header_bytes(folder / f) for f in marker["files"])
    rows = marker["rows"]
    # k == vocab keeps every logit in fp32 (exact): 4 bytes per vocabulary row
    data = 4 * args.vocab * rows if k == args.vocab else Layout(k, args.vocab).stream_bytes(rows)
    exact = data + 8 * (len(examples) + 1) + headers
    per_token = total / rows
    fp16 = 2 * args.vocab
    return {"k": k, "rows": rows, "bytes": total, "files": file_bytes, "bytes_per_token": per_token,
            "formula_bytes_per_token": 4 * args.vocab if k == args.vocab else formula_bytes(k, args.vocab),
            "format_1_bytes_per_token": 8 * k + 4, "formula_with_offsets_and_headers": exact,
            "formula_matches_files": exact == total, "fp16_bytes_per_token": fp16, "fp16_over_store": fp16 / per_token,
            "build_s": built}


def cmd_size(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    ks = sorted({int(k) for k in args.ks.split(",")})
    if not ks or min(ks) < 1 or max(ks) > args.vocab:
        raise SystemExit(f"clpd.bench.store size: --ks must be in [1, --vocab={args.vocab}], got {args.ks}")
    examples = random_examples(args.examples, args.seq_len, 0.5, args.vocab, args.seed)
    shape = Shape(16, 1, 2, 1, 32, args.vocab, tied=True)
    model = qwen_model(shape, args.seq_len, args.seed).eval()
    rows = answer_positions(examples)
    print(f"size: stores of a random Qwen2 ({shape.describe()}) over {len(examples)} random examples of "
          f"{args.seq_len} tokens ({rows:,} answer positions), against full fp16 logits ({2 * args.vocab:,} bytes per "
          "token)")
    tmp = Path(tempfile.mkdtemp(prefix="bench_store_size_"))
    try:
        results = [size_of_store(tmp / f"k{k}", k, model, examples, args, shape) for k in ks]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    head = (f"{'k':>5} {'store bytes':>12} {'bytes/token':>12} {'formula':>9} {'+offsets,headers':>17} "
            f"{'format 1':>9} {'fp16 logits':>12} {'fp16/store':>11}")
    print(head + "\n" + "-" * len(head))
    for r in results:
        print(f"{r['k']:>5} {r['bytes']:>12,} {r['bytes_per_token']:>12.2f} {r['formula_bytes_per_token']:>9,.2f} "
              f"{r['formula_with_offsets_and_headers']:>17,} {r['format_1_bytes_per_token']:>9,} "
              f"{r['fp16_bytes_per_token']:>12,} {r['fp16_over_store']:>10.0f}x")
    print("formula: a compact row's bits / 8 (clpd.teachers.compact.Layout); '+offsets,headers': the whole store "
          "(the rows' bit stream + 8 * (examples + 1) + the .npy headers), equal to the files: "
          f"{all(r['formula_matches_files'] for r in results)}; format 1: the int32 ids and fp32 logits before, "
          "k * 8 + 4")
    write_report(args.json, {"subcommand": "size", "command": sys.argv, "environment": machine(),
                             "args": report_args(args), "vocab": args.vocab, "examples": len(examples), "rows": rows,
                             "model": asdict(shape), "stores": results})
    return 0


# --- build -----------------------------------------------------------------------------------------

def weight_flops(shape: Shape, params: int, tokens: int, rows: int) -> float:
    """Forward FLOPs of a Qwen2's weight matmuls: 2 per parameter of the body (all but the embedding
    and the output layer) per token, and 2 * vocab * hidden per answer row for the output layer
    (``logits_to_keep``). Attention's own T^2 terms are left out (a few percent at 512 tokens)."""
    embedding = shape.vocab * shape.hidden
    body = params - embedding * (1 if shape.tied else 2)
    return 2.0 * body * tokens + 2.0 * embedding * rows


@dataclass
class BuildWork:
    """The teacher and examples a ``build`` stores, and how to describe them."""
    teacher: torch.nn.Module
    examples: List[dict]
    width: int
    pad_id: int
    max_length: int
    what: dict  # the store key's teacher description
    shape_text: str
    data: str
    encode_s: float


def build_work(args: argparse.Namespace, where: Placement) -> BuildWork:
    """arith: the training set and arith_plateau's large shape; qwen: random examples and a Qwen2 shape."""
    from clpd.models.load import load_model

    t0 = time.perf_counter()
    if args.preset == "arith":
        examples, tokenizer, max_length = arith_examples(args.train_limit)
        encode_s = time.perf_counter() - t0
        torch.manual_seed(args.seed)
        teacher = load_model(arith_spec("teacher"), tokenizer, dtype=where.teacher_dtype).to(where.device).eval()
        return BuildWork(teacher, examples, len(tokenizer), tokenizer.pad_token_id, max_length,
                         {"build": "arith_plateau large", "seed": args.seed}, "arith_plateau's large teacher shape",
                         f"{len(examples):,} arith training examples (encoded in {encode_s:.1f}s)", encode_s)
    args.teacher = args.teacher or PRESETS["qwen2.5-1.5b"]
    width = args.tokenizer_size or min(args.teacher.vocab, QWEN_TOKENIZER)
    if not 1 <= width <= args.teacher.vocab:
        raise SystemExit(f"clpd.bench.store build: --tokenizer-size must be in [1, {args.teacher.vocab}], got {width}")
    examples = random_examples(args.examples, args.seq_len, args.answer_fraction, width, args.seed)
    encode_s = time.perf_counter() - t0
    teacher = qwen_model(args.teacher, args.seq_len, args.seed, where.teacher_dtype, where.device).eval()
    return BuildWork(teacher, examples, width, 0, args.seq_len, {"build": args.teacher.describe(), "seed": args.seed},
                     f"a Qwen2 teacher {args.teacher.describe()}",
                     f"{len(examples):,} random examples of {args.seq_len} tokens, the last "
                     f"{args.answer_fraction:.0%} answer, ids < {width}", encode_s)


def timed_build(work: BuildWork, key, args: argparse.Namespace, where: Placement) -> dict:
    """Build the store (after one untimed batch on CUDA), open it, and measure both."""
    from clpd.teachers.store import TeacherStore, store_bytes

    tmp = Path(tempfile.mkdtemp(prefix="bench_store_build_"))
    store = dict(pad_id=work.pad_id, batch_size=args.batch_size, where=where)
    try:
        warm_s = None
        if where.cuda:  # CUDA's first kernels (cuBLAS handles, allocator growth) are not the build's cost
            start = time.perf_counter()
            write_bench_store(tmp / "warm", work.teacher, work.examples[:args.batch_size], key, **store, name="warm-up")
            where.sync()
            warm_s = time.perf_counter() - start
            shutil.rmtree(tmp / "warm", ignore_errors=True)
        folder = tmp / "store"
        where.reset_peak()
        start, c0 = time.perf_counter(), clock()
        marker = write_bench_store(folder, work.teacher, work.examples, key, **store)
        where.sync()
        wall, shares = time.perf_counter() - start, load_shares(c0, clock())
        peak = where.peak_gib()
        start = time.perf_counter()
        TeacherStore(folder, key)
        open_s = time.perf_counter() - start
        return {"marker": marker, "wall": wall, "shares": shares, "peak": peak, "open_s": open_s,
                "warm_s": warm_s, "size": store_bytes(folder)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_result(args: argparse.Namespace, work: BuildWork, run: dict, setup_s: float, params: int,
                 where: Placement) -> dict:
    marker, wall, size = run["marker"], run["wall"], run["size"]
    tokens = sum(len(e["input_ids"]) for e in work.examples)
    result = {"preset": args.preset, "examples": len(work.examples), "tokens": tokens, "rows": marker["rows"],
              "top_k": args.top_k, "kd_width": work.width, "batch_size": args.batch_size, "wall_s": wall,
              "forward_s": marker["build_s"], "examples_per_s": len(work.examples) / wall,
              "rows_per_s": marker["rows"] / wall, "tokens_per_s": tokens / wall, "bytes": size,
              "store_mib": size / 2**20, "bytes_per_row": size / marker["rows"], "open_s": run["open_s"],
              "encode_s": work.encode_s, "setup_s": setup_s, "warmup_s": run["warm_s"], "teacher_params": params,
              "random_weights": True, "device": str(where.device), "precision": where.precision,
              "peak_allocated_gib": run["peak"], **run["shares"]}
    if args.preset == "qwen":
        result["teacher_shape"] = asdict(args.teacher)
        flops = weight_flops(args.teacher, params, tokens, marker["rows"])
        result.update(weight_tflop=flops / 1e12, weight_tflop_per_s=flops / 1e12 / wall)
    return result


def print_build(result: dict) -> None:
    peak, warm_s = result["peak_allocated_gib"], result["warmup_s"]
    print(f"{'wall s':>8} {'examples/s':>11} {'answer pos/s':>13} {'rows':>11} {'store MiB':>10} {'bytes/row':>10} "
          f"{'open s':>7} {'cpu/wall':>8} {'others':>6}" + (f" {'peak GiB':>9}" if peak is not None else ""))
    print(f"{result['wall_s']:>8.1f} {result['examples_per_s']:>11,.1f} {result['rows_per_s']:>13,.0f} "
          f"{result['rows']:>11,} {result['bytes'] / 2**20:>10.1f} {result['bytes_per_row']:>10.1f} "
          f"{result['open_s']:>7.2f} {result['cpu_per_wall']:>8.2f} {result['others_cores']:>6.2f}"
          + (f" {peak:>9.2f}" if peak is not None else ""))
    print(f"(wall s: the whole write_store, forwards {result['forward_s']:.1f}s + hashing the files; open s: "
          f"TeacherStore() verifying every file's sha256, paid once by each run that reads the store"
          + (f"; {result['weight_tflop_per_s']:.1f} TFLOP/s in the weights' matmuls" if "weight_tflop" in result else "")
          + (f"; untimed warm-up of one batch first: {warm_s:.1f}s; peak GiB: torch.cuda.max_memory_allocated "
             f"during the build, the teacher's weights included" if warm_s is not None else "") + ")")


def cmd_build(args: argparse.Namespace) -> int:
    from clpd.models.load import count_parameters

    where = placement(args, "build")
    if args.batch_size is None:
        args.batch_size = BUILD_BATCH[args.preset]
    problems = [f"--{k.replace('_', '-')} must be >= 1" for k in ("batch_size", "top_k", "examples", "seq_len")
                if getattr(args, k) < 1]
    if not 0.0 < args.answer_fraction <= 1.0:
        problems.append(f"--answer-fraction must be in (0, 1], got {args.answer_fraction}")
    if problems:
        raise SystemExit("clpd.bench.store build: " + "; ".join(problems))
    threads = set_threads(args.threads)
    t0 = time.perf_counter()
    work = build_work(args, where)
    work.teacher.requires_grad_(False)
    where.sync()
    setup_s = time.perf_counter() - t0
    params = count_parameters(work.teacher)
    if not 1 <= args.top_k <= work.width:
        raise SystemExit(f"clpd.bench.store build: --top-k must be in [1, {work.width}], got {args.top_k}")
    key = bench_key(work.what, args.top_k, work.width, work.max_length, str(where.teacher_dtype).removeprefix("torch."))
    print(f"build: {work.shape_text} ({params / 1e6:.2f}M params, RANDOM weights: the forward costs the same), "
          f"{work.data}, k={args.top_k}, {args.batch_size} examples per forward, {where.describe()}, {threads} threads; "
          f"setup {setup_s:.1f}s", flush=True)
    result = build_result(args, work, timed_build(work, key, args, where), setup_s, params, where)
    print_build(result)
    write_report(args.json, {"subcommand": "build", "command": sys.argv, "environment": machine(where),
                             "args": report_args(args), "result": result})
    return 0
