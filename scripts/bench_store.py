#!/usr/bin/env python
"""What stored teacher outputs (``distill.teacher_outputs=stored``, clpd/teacher_store.py) cost and
save: step time, store size, build time and the memory of the loss (issue 14). Four subcommands,
each printing a table and, with ``--json PATH``, writing the numbers.

``step``: one optimizer step, SFT vs live KD vs stored KD, interleaved in one run.
    Every arm calls the real ``clpd.training.loop.optimizer_step`` on the same batch, cut into the same
    micro-batches by the loop's own ``clpd.training.loop.Batches`` (each carries its ``index``, where a store
    finds its rows), from the same initial student (its state reloaded and a fresh AdamW built at the
    start of every arm's run). SFT: ``sft_loss``, no teacher. live: the teacher module (its forward
    under ``no_grad``, output layer at answer positions only). stored: a ``TeacherStore`` of
    that teacher's top ``--top-k`` logits, built once beforehand (``write_store``, into a temporary
    folder; its build time is reported). KD is ``distill_loss(loss="forward_kl", alpha=0)``. A round
    runs every arm once (``--warmup`` untimed steps, then ``--steps`` timed ones), the order rotated by
    one each round. Per arm: the median over rounds of the round's mean seconds per step, the min-max
    over rounds, tokens/s (tokens the student reads that predict a next token, per median step), and
    the ratios live/SFT and stored/SFT (of the medians, and per round, min-max). Also recorded per
    run: CPU seconds per wall second of this process and the CPU cores the rest of the machine used
    (/proc/stat): a run during which others used a core was measured on a busy machine.
    Presets:
    ``--preset arith``: the micro student (conf/student/micro.yaml) and the ``large`` rung of
    conf/teachers/arith_tiny.yaml, random weights (seeded), clpd's character tokenizer, a batch of
    32 real arith training problems (clpd's Sampler, step 0) as 4 micro-batches of 8, fp32.
    ``--preset qwen``: a Qwen2.5-0.5B-shaped student and a Qwen2.5-1.5B-shaped teacher (random weights,
    Qwen2 configs, nothing downloaded; shapes from scripts/bench_distill.py, ``--student``/``--teacher``
    take another preset such as qwen2.5-7b, or h,l,heads,kv,ffn,vocab), fp32 on the CPU, 2 examples
    (``--batch-size``) of 128 (``--seq-len``) random token ids (first half prompt, second half answer),
    KD over the tokenizer's 151,665 rows. The store holds exactly the batch's examples.
    ``--device cuda`` (either preset) builds the models on the GPU and fences every timed step with
    ``torch.cuda.synchronize()``; per arm it also reports the peak of ``torch.cuda.max_memory_allocated()``
    (reset at the start of each run; both models' weights included). ``--precision bf16`` (CUDA only)
    is how clpd trains there: the student's weights fp32 under ``torch.autocast("cuda", bfloat16)`` (the
    context handed to ``optimizer_step``), the teacher's weights bf16, the store built under the same
    autocast on the GPU, fused AdamW.

``size``: bytes per answer token of a store, for k in ``--ks`` (8, 32, 128), measured from the files of
    real stores (``write_store`` of a random 1-layer Qwen2 with hidden size 16 and ``--vocab`` (151,936)
    output rows, over ``--examples`` random examples) against full fp16 logits (2 * V bytes per token);
    also the formula: k * (4 + 4) + 4 per answer row (int32 index and fp32 logit per kept row, one fp32
    tail logsumexp), plus the int64 offsets (8 bytes per example) and the four .npy headers.

``build``: the time to build a store (``write_store``): wall seconds, examples/s, answer positions/s, the
    store's size; and the time to open (verify: sha256 of every file) the store, which each run that
    reads it pays once. Random weights: the forward's cost does not depend on them. ``--top-k`` (32).
    ``--preset arith`` (default): arith's 20,000 training problems with the ``large`` arith teacher
    shape, ``--batch-size`` (64) examples per forward.
    ``--preset qwen``: ``--examples`` (512) random examples of ``--seq-len`` (512) tokens, the last
    ``--answer-fraction`` (half) answer, through a ``--teacher`` shape (qwen2.5-1.5b; e.g. qwen2.5-7b),
    ``--batch-size`` (16) examples per forward; also the TFLOP/s of its weight matmuls.
    ``--device cuda`` / ``--precision bf16`` as for ``step`` (the teacher's weights bf16, bf16 autocast);
    on CUDA one batch is stored untimed first (CUDA's first kernels), and the peak allocated memory of
    the build is reported.

``memory``: peak memory of the logits and the KD loss alone, at a ``--vocab`` (151,936) row vocabulary
    and ``--tokens`` (4096) positions per micro-batch, ``--answer-fraction`` (0.5) of them answer
    positions. The inputs are random: hidden states [tokens, 896] and output matrices [V, 896] (the
    Qwen2.5-0.5B head) for the student, the same for the teacher, so no model is involved.
    naive: full-vocabulary fp32 student and teacher logits at every position, log_softmax of both,
    forward KL (``F.kl_div(log_target=True)``) masked to the answer positions, backward to the hidden
    states. clpd_live: student logits at answer rows only (what ``logits_to_keep`` gives) and
    ``distill_loss`` (chunks of ``--chunk-size`` rows, distill.chunk_size by default) against the teacher's answer-row logits
    (computed under ``no_grad``), both freed before backward, as the loop does. clpd_stored: the
    same student side against a stored ``TopK`` (k = ``--top-k``, 32) of those teacher rows.
    Each variant runs in its own fresh process (this script, ``memory --variant X``); the number is
    the peak RSS (``resource.getrusage().ru_maxrss``) minus the RSS right before the variant starts,
    after its inputs are built (the peak is reset there through /proc/self/clear_refs where Linux
    allows it). This is RSS on the CPU, not GPU memory: it shows the same tensors, but glibc keeps
    some freed memory and a CUDA caching allocator would round differently.

Examples (the real measurements: run each alone on the machine, one at a time; times estimated for
2 idle cores from runs at small sizes)::

    python scripts/bench_store.py step --preset arith --json /tmp/bench_store_step_arith.json  # ~2 min
    python scripts/bench_store.py step --preset qwen --json /tmp/bench_store_step_qwen.json    # ~5-8 min, ~17 GB RSS
    python scripts/bench_store.py size --json /tmp/bench_store_size.json                       # ~20 s
    python scripts/bench_store.py build --json /tmp/bench_store_build.json                     # ~2-3 min, ~0.4 GB store
    python scripts/bench_store.py memory --json /tmp/bench_store_memory.json                   # ~2 min, naive ~17 GB

On a GPU (H100/H200; scripts/device_check.sh runs these two, ~30-60 s each)::

    python scripts/bench_store.py build --preset qwen --teacher qwen2.5-7b --examples 512 --seq-len 512 \
        --batch-size 16 --device cuda --precision bf16 --json /tmp/bench_store_build_7b.json
    python scripts/bench_store.py step --preset qwen --student qwen2.5-0.5b --teacher qwen2.5-7b --batch-size 8 \
        --seq-len 512 --rounds 3 --steps 5 --device cuda --precision bf16 --json /tmp/bench_store_step_7b.json

With other work on the machine, set ``--threads 1``: two OpenMP threads on two cores of which one is
busy wait for each other, and a step then takes many times longer (measured 30-50x for ``step``).

Tiny runs (seconds)::

    python scripts/bench_store.py step --preset arith --rounds 1 --steps 1 --warmup 0 --batch-size 8 --grad-accum 2 \
        --train-limit 100 --threads 1
    python scripts/bench_store.py step --preset qwen --student tiny --teacher tiny-teacher --rounds 1 --steps 1
    python scripts/bench_store.py size --vocab 1000 --examples 8
    python scripts/bench_store.py build --train-limit 200
    python scripts/bench_store.py build --preset qwen --teacher tiny-teacher --examples 8 --seq-len 32 --batch-size 4
    python scripts/bench_store.py memory --vocab 2000 --tokens 256
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout that is not pip-installed
sys.path.insert(0, str(REPO / "scripts"))  # bench_distill's Qwen2.5 shapes, bench_trl's load readings

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_distill import PRESETS, Shape, parse_shape  # noqa: E402
from bench_trl import clock, reset_peak_rss  # noqa: E402  (machine-load readings; trl itself is imported lazily there)
from clpd.config.schema import DistillConfig
from clpd.data.records import IGNORE_INDEX
from clpd.losses.sparse import TopK, top_k_outputs
from clpd.losses.distill import distill_loss

ARMS = ("sft", "live", "stored")
VARIANTS = ("naive", "clpd_live", "clpd_stored")
QWEN_VOCAB = 151936  # output rows of Qwen2.5-0.5B..3B
QWEN_TOKENIZER = 151665  # tokens of the Qwen2.5 tokenizer: the rows KD compares
QWEN_HIDDEN = 896  # Qwen2.5-0.5B


# --- small helpers ------------------------------------------------------------------------------------

def set_threads(threads: Optional[int]) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def load_shares(start: tuple, end: tuple) -> dict:
    """CPU seconds per wall second of this process, and CPU cores the rest of the machine used."""
    wall = max(end[0] - start[0], 1e-9)
    cpu = end[1] - start[1]
    return {"cpu_per_wall": cpu / wall, "others_cores": max(0.0, (end[2] - start[2]) - cpu) / wall}


def rss_mib() -> float:
    """This process's resident memory now (VmRSS), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return max_rss_mib()  # no /proc: the peak is the best there is


def max_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def environment(threads: int, where: Optional["Placement"] = None) -> dict:
    env = {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
           "python": platform.python_version(), "cpus": os.cpu_count(),
           "processor": platform.processor() or platform.machine(), "threads": threads,
           "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "git_head": git_head()}
    if where is not None:
        env.update(device=str(where.device), precision=where.precision)
        if where.cuda:
            env.update(device_name=torch.cuda.get_device_name(where.device), cuda=torch.version.cuda,
                       device_memory_gib=torch.cuda.get_device_properties(where.device).total_memory / 2**30)
    return env


def git_head() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def write_report(path: Optional[Path], report: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {path}")


def quiet_console():
    from rich.console import Console

    return Console(quiet=True)


def bench_key(what: dict, top_k: int, width: int, max_length: int, dtype: str = "float32"):
    """A store key for a benchmark's own teacher (``store_key`` would hash saved weights)."""
    from clpd.teachers.store import StoreKey

    return StoreKey(teacher={"bench": json.dumps(what, sort_keys=True)}, data="bench", top_k=top_k, width=width,
                    max_length=max_length, dtype=dtype)


def arith_spec(which: str):
    """The ModelConfig of the micro student or of arith_tiny's ``large`` rung, read from conf/."""
    from omegaconf import OmegaConf

    from clpd.config.model import ModelConfig

    if which == "student":
        entry = OmegaConf.load(REPO / "conf" / "student" / "micro.yaml")
    else:
        ladder = OmegaConf.load(REPO / "conf" / "teachers" / "arith_tiny.yaml").ladder
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


def qwen_model(shape: Shape, seq_len: int, seed: int, dtype: torch.dtype = torch.float32,
               device: torch.device = torch.device("cpu")) -> torch.nn.Module:
    """A random-weight Qwen2 of ``shape``, built directly on ``device`` (bench_distill.build_model)."""
    from bench_distill import build_model

    torch.manual_seed(seed)
    return build_model(shape, dtype, device, seq_len)


@dataclass
class Placement:
    """Where and in what precision a subcommand runs, as clpd trains: on CUDA with bf16, the student's
    weights fp32 under ``torch.autocast("cuda", dtype=torch.bfloat16)``, the teacher's weights in bf16
    (clpd.teachers.live.teacher_dtype), the store built under the same autocast; fp32 everywhere else."""
    device: torch.device
    precision: str  # fp32 | bf16
    autocast_dtype: Optional[torch.dtype]
    teacher_dtype: torch.dtype

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        """A fresh autocast context (what clpd.training.loop.train passes to optimizer_step), or a null one."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> Optional[float]:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def allocated_gib(self) -> Optional[float]:
        return torch.cuda.memory_allocated() / 2**30 if self.cuda else None

    def describe(self) -> str:
        name = f"cuda ({torch.cuda.get_device_name(self.device)})" if self.cuda else "cpu"
        if self.precision == "bf16":
            return f"{name}, bf16 (student fp32 under bf16 autocast, teacher bf16)"
        return f"{name}, fp32"


def placement(args: argparse.Namespace, command: str) -> Placement:
    """``--device``/``--precision`` checked (each problem refused in one line) and resolved."""
    if args.precision == "bf16" and args.device != "cuda":
        raise SystemExit(f"bench_store.py {command}: --precision bf16 needs --device cuda (on a CPU clpd trains "
                         "and builds stores in fp32)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench_store.py {command}: --device cuda but torch {torch.__version__} sees no CUDA device")
    bf16 = args.precision == "bf16"
    return Placement(torch.device(args.device), args.precision, torch.bfloat16 if bf16 else None,
                     torch.bfloat16 if bf16 else torch.float32)


def answer_positions(examples: Sequence[dict]) -> int:
    return sum(sum(1 for t in e["labels"][1:] if t != IGNORE_INDEX) for e in examples)


def summarize(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# --- step ---------------------------------------------------------------------------------------------

@dataclass
class Workload:
    """What every arm of ``step`` trains on: the batch (the training set of this benchmark, indexed
    as the store is), its micro-batches, the student (reloaded from its initial weights before every
    arm's run) and the teacher."""
    examples: List[dict]
    step: object  # clpd.training.loop.StepBatch
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


def step_workload(args: argparse.Namespace, where: Placement) -> Workload:
    from clpd.curriculum.sampler import Sampler
    from clpd.training.batches import Batches
    from clpd.models.load import count_parameters

    if args.preset == "arith":
        from clpd.models.load import load_model

        examples, tokenizer, max_length = arith_examples(args.train_limit)
        pick = Sampler(range(len(examples)), args.batch_size, seed=args.seed).batch(0)
        batch = [examples[i] for i in pick]
        pad_id, width = tokenizer.pad_token_id, len(tokenizer)
        torch.manual_seed(args.seed)
        student = load_model(arith_spec("student"), tokenizer).to(where.device)
        torch.manual_seed(args.seed + 1)
        teacher = load_model(arith_spec("teacher"), tokenizer, dtype=where.teacher_dtype).to(where.device)
        shapes = {"student": "conf/student/micro.yaml", "teacher": "conf/teachers/arith_tiny.yaml: large"}
        data = (f"{len(batch)} arith training problems (Sampler(range({len(examples)}), {args.batch_size}, "
                f"seed={args.seed}).batch(0))")
    else:
        width = args.tokenizer_size or min(args.student.vocab, args.teacher.vocab, QWEN_TOKENIZER)
        batch = random_examples(args.batch_size, args.seq_len, args.answer_fraction, width, args.seed)
        pad_id, max_length = 0, args.seq_len
        student = qwen_model(args.student, args.seq_len, args.seed, torch.float32, where.device)
        teacher = qwen_model(args.teacher, args.seq_len, args.seed + 1, where.teacher_dtype, where.device)
        shapes = {"student": args.student.describe(), "teacher": args.teacher.describe()}
        data = (f"{len(batch)} random examples of {args.seq_len} tokens, the last {args.answer_fraction:.0%} answer, "
                f"ids < {width}")
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
    device under its autocast (as clpd.teachers.store.build_store does): (TeacherStore, numbers)."""
    from clpd.teachers.store import TeacherStore, store_bytes, write_store

    where = work.where
    key = bench_key(what, top_k, work.width, work.max_length, str(where.teacher_dtype).removeprefix("torch."))
    where.reset_peak()
    start = time.perf_counter()
    marker = write_store(folder, work.teacher, work.examples, key, pad_id=work.pad_id, batch_size=batch_size,
                         device=where.device, autocast_dtype=where.autocast_dtype, console=quiet_console(),
                         name="bench")
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
    ``clpd.training.loop.optimizer_step`` under the workload's autocast. On CUDA each step is fenced by
    ``torch.cuda.synchronize()`` and the peak allocated memory of the run (both models' weights,
    AdamW's state, activations, logits, loss) is read after resetting it at the run's start."""
    from clpd.config.schema import TrainerConfig
    from clpd.training.step import build_optimizer, optimizer_step, sft_loss

    where = work.where
    reload(work.student, initial)
    gc.collect()
    where.reset_peak()
    before = where.allocated_gib()
    cfg = TrainerConfig(lr=args.lr, grad_accum=args.grad_accum, batch_size=args.batch_size)
    optimizer = build_optimizer(work.student, cfg, fused=where.cuda)
    scaler = torch.amp.GradScaler(where.device.type, enabled=False)  # bf16 and fp32 need no loss scaling
    autocast = where.autocast()
    kd = functools.partial(distill_loss, loss="forward_kl", alpha=0.0, vocab_size=work.width)
    loss_fn, teacher = {"sft": (sft_loss, None), "live": (kd, work.teacher), "stored": (kd, store)}[arm]
    step_s, losses, applied = [], [], 0
    start = None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            start = clock()
        where.sync()
        t0 = time.perf_counter()
        result = optimizer_step(work.student, optimizer, scaler, work.step.micro_batches,
                                answer_tokens=work.step.answer_tokens, loss_fn=loss_fn, teacher=teacher,
                                autocast=autocast, grad_clip=cfg.grad_clip)
        where.sync()
        seconds = time.perf_counter() - t0
        losses.append(result.loss)
        if i >= args.warmup:
            step_s.append(seconds)
            applied += result.applied
    shares = load_shares(start, clock())
    peak = where.peak_gib()
    del optimizer
    gc.collect()
    out = {"step_s": step_s, "mean_step_s": statistics.fmean(step_s), "losses": losses, "applied": applied, **shares}
    if peak is not None:
        out.update(peak_allocated_gib=peak, allocated_before_gib=before)
    return out


def summarize_arms(runs: Dict[str, List[dict]], tokens_per_step: int) -> Dict[str, dict]:
    """Per arm: median over rounds of the round's mean s/step, min-max, tokens/s; and each arm's
    ratio to SFT (of the medians, and per round)."""
    out = {}
    for arm, rounds in runs.items():
        s = summarize([r["mean_step_s"] for r in rounds])
        out[arm] = {"median_step_s": s["median"], "min_step_s": s["min"], "max_step_s": s["max"],
                    "tokens_per_s": tokens_per_step / s["median"], "rounds": len(rounds),
                    "cpu_per_wall": statistics.median(r["cpu_per_wall"] for r in rounds),
                    "max_others_cores": max(r["others_cores"] for r in rounds),
                    "first_loss": rounds[0]["losses"][0], "steps_applied": sum(r["applied"] for r in rounds),
                    "steps_timed": sum(len(r["step_s"]) for r in rounds)}
        if all("peak_allocated_gib" in r for r in rounds):
            out[arm]["peak_allocated_gib"] = max(r["peak_allocated_gib"] for r in rounds)
    if "sft" in out:
        for arm in out:
            out[arm]["ratio_to_sft"] = out[arm]["median_step_s"] / out["sft"]["median_step_s"]
            per_round = [a["mean_step_s"] / b["mean_step_s"] for a, b in zip(runs[arm], runs["sft"])]
            out[arm]["round_ratios_to_sft"] = per_round
    return out


def step_table(summary: Dict[str, dict]) -> str:
    gpu = all("peak_allocated_gib" in s for s in summary.values())
    head = (f"{'arm':<8} {'s/step':>9} {'min-max over rounds':>21} {'tokens/s':>10} {'x SFT':>6} {'per round':>11} "
            f"{'cpu/wall':>8} {'others':>6} {'loss@1':>8}" + (f" {'peak GiB':>9}" if gpu else ""))
    lines = [head, "-" * len(head)]
    for arm, s in summary.items():
        rounds = s.get("round_ratios_to_sft") or []
        spread = f"{min(rounds):.2f}-{max(rounds):.2f}" if rounds else "-"
        lines.append(f"{arm:<8} {s['median_step_s']:>9.4f} {s['min_step_s']:>10.4f}-{s['max_step_s']:<10.4f} "
                     f"{s['tokens_per_s']:>10,.0f} {s.get('ratio_to_sft', float('nan')):>5.2f}x {spread:>11} "
                     f"{s['cpu_per_wall']:>8.2f} {s['max_others_cores']:>6.2f} {s['first_loss']:>8.4f}"
                     + (f" {s['peak_allocated_gib']:>9.2f}" if gpu else ""))
    return "\n".join(lines)


def cmd_step(args: argparse.Namespace) -> int:
    preset = STEP_DEFAULTS[args.preset]
    for name, value in preset.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.preset == "qwen":
        args.student = args.student or PRESETS["qwen2.5-0.5b"]
        args.teacher = args.teacher or PRESETS["qwen2.5-1.5b"]
    problems = [f"--{k.replace('_', '-')} must be >= 1"
                for k in ("steps", "rounds", "batch_size", "grad_accum", "top_k") if getattr(args, k) < 1]
    if args.warmup < 0:
        problems.append("--warmup must be >= 0")
    if args.batch_size % args.grad_accum:
        problems.append(f"--batch-size {args.batch_size} must divide by --grad-accum {args.grad_accum}")
    if problems:
        raise SystemExit("bench_store.py step: " + "; ".join(problems))
    where = placement(args, "step")
    threads = set_threads(args.threads)

    t0 = time.perf_counter()
    work = step_workload(args, where)
    where.sync()
    prep_s = time.perf_counter() - t0
    if args.top_k > work.width:
        raise SystemExit(f"bench_store.py step: --top-k {args.top_k} exceeds the {work.width} vocabulary rows compared")
    d = work.describe
    print(f"step: SFT vs live KD vs stored KD through clpd.training.loop.optimizer_step; torch {torch.__version__}, "
          f"{threads} threads, {os.cpu_count()} CPUs; {where.describe()}", flush=True)
    weights = f"; weights on the GPU {d['weights_gib']:.2f} GiB" if where.cuda else ""
    print(f"student {d['student']} ({d['student_params'] / 1e6:.2f}M params), teacher {d['teacher']} "
          f"({d['teacher_params'] / 1e6:.2f}M), random weights, {where.precision}{weights}", flush=True)
    print(f"batch: {d['data']}; {d['micro_batches']} micro-batches, {d['tokens_per_step']:,} tokens "
          f"({d['answer_tokens_per_step']:,} answer) per step, KD over {d['kd_width']:,} rows; "
          f"{args.warmup} warm-up + {args.steps} timed steps per arm, {args.rounds} rounds; setup {prep_s:.1f}s",
          flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench_store_"))
    try:
        initial = save_initial(work.student, tmp / "student.pt")
        store, store_info = build_bench_store(work, args.top_k, args.store_batch_size, tmp / "store",
                                              {"preset": args.preset, "seed": args.seed})
        print(f"store: top-{args.top_k} of the teacher at {store_info['rows']:,} answer positions of "
              f"{store_info['examples']} examples, {store_info['bytes'] / 2**20:.2f} MiB, built in "
              f"{store_info['build_s']:.2f}s (first forwards included), opened (verified) in "
              f"{store_info['open_s']:.3f}s"
              + (f", peak {store_info['peak_allocated_gib']:.2f} GiB" if where.cuda else ""), flush=True)
        runs: Dict[str, List[dict]] = {arm: [] for arm in ARMS}
        started = time.perf_counter()
        for r in range(args.rounds):
            for arm in ARMS[r % len(ARMS):] + ARMS[:r % len(ARMS)]:
                out = run_arm(work, arm, store, initial, args)
                runs[arm].append({"round": r, **out})
                peak = f"  peak {out['peak_allocated_gib']:.2f} GiB" if "peak_allocated_gib" in out else ""
                print(f"round {r + 1} {arm:<7} {out['mean_step_s']:.4f} s/step  cpu/wall {out['cpu_per_wall']:.2f}  "
                      f"others {out['others_cores']:.2f} cores  loss {out['losses'][0]:.4f} -> {out['losses'][-1]:.4f}"
                      f"{peak}", flush=True)
        wall = time.perf_counter() - started
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize_arms(runs, d["tokens_per_step"])
    print(f"\nmedian over {args.rounds} rounds of each round's mean s/step; 'per round': the arm's s/step over "
          f"SFT's in the same round; 'others': the most CPU cores the rest of the machine used in a run; "
          f"loss@1: the first step's loss per answer token (stored <= live: the top-{args.top_k} + tail coarsening)"
          + ("; peak GiB: torch.cuda.max_memory_allocated over the arm's runs (both models' weights included), "
             "reset at each run's start" if where.cuda else ""))
    print(step_table(summary))
    print(f"\nlive/SFT {summary['live']['ratio_to_sft']:.2f}x, stored/SFT {summary['stored']['ratio_to_sft']:.2f}x, "
          f"stored/live {summary['stored']['median_step_s'] / summary['live']['median_step_s']:.2f}x; "
          f"{wall:.0f}s of arms")
    unapplied = {arm: s["steps_timed"] - s["steps_applied"] for arm, s in summary.items()
                 if s["steps_applied"] < s["steps_timed"]}
    if unapplied:
        print(f"WARNING: steps not applied (non-finite loss; no optimizer update was timed): {unapplied}")
    write_report(args.json, {
        "subcommand": "step", "command": sys.argv, "environment": environment(threads, where),
        "args": {k: asdict(v) if isinstance(v, Shape) else v for k, v in vars(args).items() if k != "func"},
        "workload": d, "setup_s": prep_s, "store": store_info, "summary": summary,
        "ratios": {"live/sft": summary["live"]["ratio_to_sft"], "stored/sft": summary["stored"]["ratio_to_sft"],
                   "stored/live": summary["stored"]["median_step_s"] / summary["live"]["median_step_s"]},
        "runs": runs, "wall_s": wall})
    return 0


STEP_DEFAULTS = {
    "arith": {"batch_size": 32, "grad_accum": 4, "rounds": 5, "steps": 20, "warmup": 1, "lr": 5e-3},
    "qwen": {"batch_size": 2, "grad_accum": 1, "rounds": 3, "steps": 2, "warmup": 1, "lr": 1e-5},
}


# --- size ---------------------------------------------------------------------------------------------

def formula_bytes(k: int) -> int:
    """Bytes per answer row: k int32 indices, k fp32 logits, one fp32 tail logsumexp."""
    return k * (4 + 4) + 4


def npy_header_bytes(path: Path) -> int:
    """The .npy header's bytes: the file's size less its array's."""
    import numpy as np

    return path.stat().st_size - np.load(path, mmap_mode="r").nbytes


def cmd_size(args: argparse.Namespace) -> int:
    from clpd.teachers.store import ARRAYS, store_bytes, write_store

    threads = set_threads(args.threads)
    ks = sorted({int(k) for k in args.ks.split(",")})
    if not ks or min(ks) < 1 or max(ks) > args.vocab:
        raise SystemExit(f"bench_store.py size: --ks must be in [1, --vocab={args.vocab}], got {args.ks}")
    examples = random_examples(args.examples, args.seq_len, 0.5, args.vocab, args.seed)
    shape = Shape(16, 1, 2, 1, 32, args.vocab, tied=True)
    model = qwen_model(shape, args.seq_len, args.seed).eval()
    rows = answer_positions(examples)
    fp16 = 2 * args.vocab
    print(f"size: stores of a random Qwen2 ({shape.describe()}) over {len(examples)} random examples of "
          f"{args.seq_len} tokens ({rows:,} answer positions), against full fp16 logits ({fp16:,} bytes per token)")
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_store_size_"))
    try:
        for k in ks:
            folder = tmp / f"k{k}"
            key = bench_key({"size": shape.describe(), "seed": args.seed}, k, args.vocab, args.seq_len)
            start = time.perf_counter()
            marker = write_store(folder, model, examples, key, pad_id=0, batch_size=args.store_batch_size,
                                 device=torch.device("cpu"), autocast_dtype=None, console=quiet_console(), name="size")
            built = time.perf_counter() - start
            total = store_bytes(folder)
            files = {a: (folder / f"{a}.npy").stat().st_size for a in ARRAYS}
            headers = sum(npy_header_bytes(folder / f"{a}.npy") for a in ARRAYS)
            exact = formula_bytes(k) * marker["rows"] + 8 * (len(examples) + 1) + headers
            per_token = total / marker["rows"]
            results.append({"k": k, "rows": marker["rows"], "bytes": total, "files": files,
                            "bytes_per_token": per_token,
                            "formula_bytes_per_token": formula_bytes(k),
                            "formula_with_offsets_and_headers": exact, "formula_matches_files": exact == total,
                            "fp16_bytes_per_token": fp16, "fp16_over_store": fp16 / per_token, "build_s": built})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    head = (f"{'k':>5} {'store bytes':>12} {'bytes/token':>12} {'formula k*8+4':>14} {'+offsets,headers':>17} "
            f"{'fp16 logits':>12} {'fp16/store':>11}")
    print(head + "\n" + "-" * len(head))
    for r in results:
        print(f"{r['k']:>5} {r['bytes']:>12,} {r['bytes_per_token']:>12.2f} {r['formula_bytes_per_token']:>14,} "
              f"{r['formula_with_offsets_and_headers']:>17,} {r['fp16_bytes_per_token']:>12,} "
              f"{r['fp16_over_store']:>10.0f}x")
    print("'+offsets,headers': the formula's bytes for the whole store (rows * (k*8+4) + 8 * (examples + 1) + the "
          f".npy headers); equal to the files: {all(r['formula_matches_files'] for r in results)}")
    write_report(args.json, {"subcommand": "size", "command": sys.argv, "environment": environment(threads),
                             "args": {k: v for k, v in vars(args).items() if k != "func"},
                             "vocab": args.vocab, "examples": len(examples), "rows": rows, "model": asdict(shape),
                             "stores": results})
    return 0


# --- build --------------------------------------------------------------------------------------------

BUILD_BATCH = {"arith": 64, "qwen": 16}  # default --batch-size: examples per teacher forward


def weight_flops(shape: Shape, params: int, tokens: int, rows: int) -> float:
    """Forward FLOPs of a Qwen2's weight matmuls: 2 per parameter of the body (all but the embedding
    and the output layer) per token, and 2 * vocab * hidden per answer row for the output layer
    (``logits_to_keep``). Attention's own T^2 terms are left out (a few percent at 512 tokens)."""
    embedding = shape.vocab * shape.hidden
    body = params - embedding * (1 if shape.tied else 2)
    return 2.0 * body * tokens + 2.0 * embedding * rows


def cmd_build(args: argparse.Namespace) -> int:
    from clpd.models.load import count_parameters
    from clpd.teachers.store import TeacherStore, store_bytes, write_store

    where = placement(args, "build")
    if args.batch_size is None:
        args.batch_size = BUILD_BATCH[args.preset]
    problems = [f"--{k.replace('_', '-')} must be >= 1" for k in ("batch_size", "top_k", "examples", "seq_len")
                if getattr(args, k) < 1]
    if not 0.0 < args.answer_fraction <= 1.0:
        problems.append(f"--answer-fraction must be in (0, 1], got {args.answer_fraction}")
    if problems:
        raise SystemExit("bench_store.py build: " + "; ".join(problems))
    threads = set_threads(args.threads)
    t0 = time.perf_counter()
    if args.preset == "arith":
        from clpd.models.load import load_model

        examples, tokenizer, max_length = arith_examples(args.train_limit)
        encode_s = time.perf_counter() - t0
        torch.manual_seed(args.seed)
        teacher = load_model(arith_spec("teacher"), tokenizer, dtype=where.teacher_dtype).to(where.device).eval()
        width, pad_id = len(tokenizer), tokenizer.pad_token_id
        what = {"build": "arith_tiny large", "seed": args.seed}
        shape_text = "arith_tiny's large teacher shape"
        data = f"{len(examples):,} arith training examples (encoded in {encode_s:.1f}s)"
    else:
        args.teacher = args.teacher or PRESETS["qwen2.5-1.5b"]
        width = args.tokenizer_size or min(args.teacher.vocab, QWEN_TOKENIZER)
        if not 1 <= width <= args.teacher.vocab:
            raise SystemExit(f"bench_store.py build: --tokenizer-size must be in [1, {args.teacher.vocab}], got {width}")
        examples = random_examples(args.examples, args.seq_len, args.answer_fraction, width, args.seed)
        encode_s = time.perf_counter() - t0
        teacher = qwen_model(args.teacher, args.seq_len, args.seed, where.teacher_dtype, where.device).eval()
        pad_id, max_length = 0, args.seq_len
        what = {"build": args.teacher.describe(), "seed": args.seed}
        shape_text = f"a Qwen2 teacher {args.teacher.describe()}"
        data = (f"{len(examples):,} random examples of {args.seq_len} tokens, the last {args.answer_fraction:.0%} "
                f"answer, ids < {width}")
    teacher.requires_grad_(False)
    where.sync()
    setup_s = time.perf_counter() - t0
    params = count_parameters(teacher)
    if not 1 <= args.top_k <= width:
        raise SystemExit(f"bench_store.py build: --top-k must be in [1, {width}], got {args.top_k}")
    key = bench_key(what, args.top_k, width, max_length, str(where.teacher_dtype).removeprefix("torch."))
    print(f"build: {shape_text} ({params / 1e6:.2f}M params, RANDOM weights: the forward costs the same), {data}, "
          f"k={args.top_k}, {args.batch_size} examples per forward, {where.describe()}, {threads} threads; "
          f"setup {setup_s:.1f}s", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_store_build_"))
    try:
        warm_s = None
        if where.cuda:  # CUDA's first kernels (cuBLAS handles, allocator growth) are not the build's cost
            start = time.perf_counter()
            write_store(tmp / "warm", teacher, examples[:args.batch_size], key, pad_id=pad_id,
                        batch_size=args.batch_size, device=where.device, autocast_dtype=where.autocast_dtype,
                        console=quiet_console(), name="warm-up")
            where.sync()
            warm_s = time.perf_counter() - start
            shutil.rmtree(tmp / "warm", ignore_errors=True)
        folder = tmp / "store"
        where.reset_peak()
        start, c0 = time.perf_counter(), clock()
        marker = write_store(folder, teacher, examples, key, pad_id=pad_id, batch_size=args.batch_size,
                             device=where.device, autocast_dtype=where.autocast_dtype, console=quiet_console(),
                             name="bench")
        where.sync()
        wall, shares = time.perf_counter() - start, load_shares(c0, clock())
        peak = where.peak_gib()
        start = time.perf_counter()
        TeacherStore(folder, key)
        open_s = time.perf_counter() - start
        size = store_bytes(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens = sum(len(e["input_ids"]) for e in examples)
    result = {"preset": args.preset, "examples": len(examples), "tokens": tokens, "rows": marker["rows"],
              "top_k": args.top_k, "kd_width": width, "batch_size": args.batch_size, "wall_s": wall,
              "forward_s": marker["build_s"], "examples_per_s": len(examples) / wall,
              "rows_per_s": marker["rows"] / wall, "tokens_per_s": tokens / wall, "bytes": size,
              "store_mib": size / 2**20, "bytes_per_row": size / marker["rows"], "open_s": open_s,
              "encode_s": encode_s, "setup_s": setup_s, "warmup_s": warm_s, "teacher_params": params,
              "random_weights": True, "device": str(where.device), "precision": where.precision,
              "peak_allocated_gib": peak, **shares}
    if args.preset == "qwen":
        result["teacher_shape"] = asdict(args.teacher)
        flops = weight_flops(args.teacher, params, tokens, marker["rows"])
        result.update(weight_tflop=flops / 1e12, weight_tflop_per_s=flops / 1e12 / wall)
    print(f"{'wall s':>8} {'examples/s':>11} {'answer pos/s':>13} {'rows':>11} {'store MiB':>10} {'bytes/row':>10} "
          f"{'open s':>7} {'cpu/wall':>8} {'others':>6}" + (f" {'peak GiB':>9}" if peak is not None else ""))
    print(f"{wall:>8.1f} {result['examples_per_s']:>11,.1f} {result['rows_per_s']:>13,.0f} {marker['rows']:>11,} "
          f"{size / 2**20:>10.1f} {result['bytes_per_row']:>10.1f} {open_s:>7.2f} {shares['cpu_per_wall']:>8.2f} "
          f"{shares['others_cores']:>6.2f}" + (f" {peak:>9.2f}" if peak is not None else ""))
    print(f"(wall s: the whole write_store, forwards {marker['build_s']:.1f}s + hashing the files; open s: "
          f"TeacherStore() verifying every file's sha256, paid once by each run that reads the store"
          + (f"; {result['weight_tflop_per_s']:.1f} TFLOP/s in the weights' matmuls" if "weight_tflop" in result else "")
          + (f"; untimed warm-up of one batch first: {warm_s:.1f}s; peak GiB: torch.cuda.max_memory_allocated "
             f"during the build, the teacher's weights included" if warm_s is not None else "") + ")")
    write_report(args.json, {"subcommand": "build", "command": sys.argv, "environment": environment(threads, where),
                             "args": {k: asdict(v) if isinstance(v, Shape) else v for k, v in vars(args).items()
                                      if k != "func"}, "result": result})
    return 0


# --- memory -------------------------------------------------------------------------------------------

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


def clpd_kd(h_s, h_t, w_s, w_t, targets, *, top_k=None, chunk_size: int, **_) -> torch.Tensor:
    """clpd's loop: logits at answer rows only (``logits_to_keep``), the teacher's under
    ``no_grad`` (or its stored TopK), chunked ``distill_loss``, logits freed before backward."""
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    if top_k is None:
        with torch.no_grad():  # as the loop runs its teacher
            teacher = h_t[keep] @ w_t.T
    else:
        teacher = top_k
    student = h_s[keep] @ w_s.T
    parts = distill_loss(student, teacher, targets[keep], loss="forward_kl", alpha=0.0, chunk_size=chunk_size,
                         vocab_size=w_s.size(0))
    loss = parts.total / n
    del student, teacher, parts
    loss.backward()
    return loss.detach()


# Peak over the RSS before, in fp32 [rows, V] matrices (rows: every position for naive, the answer
# positions for clpd), as measured at small sizes (V=20,000, 1,024 positions: 7.2, 10.4, 6.1), rounded up.
PEAK_MATRICES = {"naive": 8, "clpd_live": 11, "clpd_stored": 7}


def estimate_mib(variant: str, tokens: int, answer: int, vocab: int, hidden: int) -> float:
    """What a variant's process needs at most: its inputs, ~0.5 GiB of Python and torch, its peak."""
    rows = tokens if variant == "naive" else answer
    return (2 * vocab * hidden * 4 + PEAK_MATRICES[variant] * rows * vocab * 4) / 2**20 + 512


def mem_available_mib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory_variant(args: argparse.Namespace) -> dict:
    """Child: one variant, measured alone in this process."""
    threads = set_threads(args.threads)
    fn = naive_kd if args.variant == "naive" else functools.partial(clpd_kd, chunk_size=args.chunk_size)
    stored = args.variant == "clpd_stored"
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
    before = rss_mib()
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


def cmd_memory(args: argparse.Namespace) -> int:
    if args.variant is not None:
        print("RESULT " + json.dumps(memory_variant(args)), flush=True)
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise SystemExit(f"bench_store.py memory: --variants from {', '.join(VARIANTS)}, got {args.variants}")
    n_answer = max(1, round(args.tokens * args.answer_fraction))
    full = args.tokens * args.vocab * 4 / 2**20
    print(f"memory: logits + forward-KL loss + backward at V={args.vocab:,}, {args.tokens:,} positions "
          f"({n_answer:,} answer), hidden {args.hidden}; peak RSS on the CPU over the RSS before, each variant "
          f"in its own process; one fp32 [positions, V] is {full:,.0f} MiB, [answer, V] "
          f"{n_answer * args.vocab * 4 / 2**20:,.0f} MiB", flush=True)
    results = {}
    for variant in variants:
        need, free = estimate_mib(variant, args.tokens, n_answer, args.vocab, args.hidden), mem_available_mib()
        if free is not None and need > free and not args.force:
            results[variant] = {"variant": variant, "error": f"skipped: needs about {need:,.0f} MiB, {free:,.0f} MiB "
                                                             f"available (--force runs it anyway)"}
            print(f"{variant}: {results[variant]['error']}", flush=True)
            continue
        command = [sys.executable, str(Path(__file__).resolve()), "memory", "--variant", variant,
                   "--tokens", str(args.tokens), "--answer-fraction", str(args.answer_fraction),
                   "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--top-k", str(args.top_k),
                   "--chunk-size", str(args.chunk_size), "--seed", str(args.seed)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        out = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            results[variant] = {"variant": variant,
                                "error": f"exit status {out.returncode}: {out.stderr.strip()[-500:]}"}
            print(f"{variant}: FAILED ({results[variant]['error']})", flush=True)
            continue
        results[variant] = json.loads(lines[-1][len("RESULT "):])
        r = results[variant]
        print(f"{variant:<12} {r['peak_mib']:>9,.0f} MiB  ({r['seconds']:.2f}s)", flush=True)
    naive = results.get("naive", {}).get("peak_mib")
    for r in results.values():
        if "peak_mib" in r and naive:
            r["ratio_to_naive"] = r["peak_mib"] / naive
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
    threads = set_threads(args.threads)
    write_report(args.json, {"subcommand": "memory", "command": sys.argv, "environment": environment(threads),
                             "args": {k: v for k, v in vars(args).items() if k != "func"},
                             "full_logits_mib": full, "answer_positions": n_answer, "variants": results})
    return 0 if all("error" not in r for r in results.values()) else 1


# --- command line -------------------------------------------------------------------------------------


def qwen_examples(parser: argparse.ArgumentParser, *, seq_len: int) -> None:
    """The qwen preset's random examples and teacher shape (``step`` and ``build``)."""
    parser.add_argument("--seq-len", type=int, default=seq_len, help="qwen: tokens per example")
    parser.add_argument("--answer-fraction", type=float, default=0.5, help="qwen: the answer's share of each example")
    parser.add_argument("--teacher", type=parse_shape, default=None, metavar="PRESET|h,l,heads,kv,ffn,vocab",
                        help="qwen: the teacher's shape (default qwen2.5-1.5b; qwen2.5-7b on a GPU)")
    parser.add_argument("--tokenizer-size", type=int, default=None,
                        help=f"qwen: rows compared, kept in a store's top-k and ids are drawn from (default: "
                             f"min({QWEN_TOKENIZER}, the models' rows))")

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="subcommand", required=True)

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

    s = sub.add_parser("step", help="one optimizer step: SFT vs live KD vs stored KD, interleaved",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--preset", choices=sorted(STEP_DEFAULTS), default="arith")
    s.add_argument("--rounds", type=int, default=None, help="rounds (default: arith 5, qwen 3)")
    s.add_argument("--steps", type=int, default=None, help="timed steps per arm and round (default: arith 20, qwen 2)")
    s.add_argument("--warmup", type=int, default=None, help="untimed steps first in every arm run (default 1)")
    s.add_argument("--batch-size", type=int, default=None, help="examples per step (default: arith 32, qwen 2)")
    s.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default: arith 4, qwen 1)")
    s.add_argument("--lr", type=float, default=None, help="AdamW's lr (default: arith 5e-3, qwen 1e-5)")
    s.add_argument("--top-k", type=int, default=32, help="logits kept per answer position in the store")
    s.add_argument("--store-batch-size", type=int, default=64, help="examples per teacher forward building the store")
    s.add_argument("--train-limit", type=int, default=None, help="arith: draw the batch from the first N problems")
    s.add_argument("--student", type=parse_shape, default=None, metavar="PRESET|h,l,heads,kv,ffn,vocab",
                   help="qwen: the student's shape (default qwen2.5-0.5b)")
    qwen_examples(s, seq_len=128)
    placed(s)
    common(s)
    s.set_defaults(func=cmd_step)

    z = sub.add_parser("size", help="bytes per answer token of a store vs full fp16 logits",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    z.add_argument("--ks", default="8,32,128", help="comma-separated k")
    z.add_argument("--vocab", type=int, default=QWEN_VOCAB, help="output rows (all of them compared)")
    z.add_argument("--examples", type=int, default=48)
    z.add_argument("--seq-len", type=int, default=64, help="tokens per example, the second half answer")
    z.add_argument("--store-batch-size", type=int, default=8)
    common(z)
    z.set_defaults(func=cmd_size)

    b = sub.add_parser("build", help="time to build a store: arith's training set, or random examples for a Qwen shape",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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

    m = sub.add_parser("memory", help="peak RSS of logits + KD loss: naive vs clpd live vs clpd stored",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("--tokens", type=int, default=4096, help="positions per micro-batch")
    m.add_argument("--answer-fraction", type=float, default=0.5)
    m.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    m.add_argument("--hidden", type=int, default=QWEN_HIDDEN)
    m.add_argument("--top-k", type=int, default=32)
    m.add_argument("--chunk-size", type=int, default=DistillConfig.chunk_size, help="the loss's chunk (distill.chunk_size)")
    m.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    m.add_argument("--force", action="store_true", help="run a variant even when it looks larger than MemAvailable")
    m.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)  # internal: the child
    common(m)
    m.set_defaults(func=cmd_memory)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
