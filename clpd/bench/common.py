"""What the benchmarks share: clock and busy-CPU readings, interleaved rounds, a run in a forked
process, the record of where and on which code a benchmark ran (versions, processor, load, git
head, dirty flag, sha256 of the files it measures), the JSON report, Qwen2-shaped random-weight
models and the device/precision placement. The machine and memory probes themselves are
:mod:`clpd.environment`'s."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import signal
import statistics
import subprocess
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch

from clpd.environment import environment

REPO = Path(__file__).resolve().parents[2]  # the checkout (git provenance); site-packages in a wheel install

# The code a step's time depends on: its sha256 goes into a report, so two reports of one commit
# with local edits can still be told apart.
MEASURED = ("clpd/training/step.py", "clpd/training/loop.py", "clpd/training/batches.py", "clpd/data/batching.py",
            "clpd/config.py", "clpd/config/*.py", "clpd/losses.py", "clpd/losses/*.py")

QWEN_VOCAB = 151936  # output rows of Qwen2.5-0.5B..3B
QWEN_TOKENIZER = 151665  # tokens of the Qwen2.5 tokenizer: the rows KD compares
QWEN_HIDDEN = 896  # Qwen2.5-0.5B


def set_threads(threads: Optional[int]) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# --- clock and load ---------------------------------------------------------------------------------

CLOCK_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (every process, /proc/stat); 0 where unknown."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICK


def clock() -> tuple:
    """(wall, this process's CPU, the machine's busy CPU) seconds, read at a step boundary."""
    return time.perf_counter(), time.process_time(), busy_cpu_s()


def load_shares(start: tuple, end: tuple) -> dict:
    """CPU seconds per wall second of this process, and CPU cores the rest of the machine used,
    between two :func:`clock` readings. A run during which others used a core ran on a busy machine:
    with as many threads as cores, each OpenMP region then waits for its descheduled thread."""
    wall = max(end[0] - start[0], 1e-9)
    cpu = end[1] - start[1]
    return {"cpu_per_wall": cpu / wall, "others_cores": max(0.0, (end[2] - start[2]) - cpu) / wall}


def others_cores_now(seconds: float = 2.0) -> float:
    """CPU cores the rest of the machine uses now (this process sleeps meanwhile)."""
    start = clock()
    time.sleep(seconds)
    return load_shares(start, clock())["others_cores"]


def wait_quiet(max_others: float, timeout: float) -> tuple:
    """Wait (at most ``timeout`` seconds) until the rest of the machine uses at most ``max_others``
    cores: (seconds waited, the last reading). A run on a busy machine measures the machine."""
    start = time.perf_counter()
    while True:
        others = others_cores_now()
        waited = time.perf_counter() - start
        if others <= max_others or waited >= timeout:
            return waited, others
        time.sleep(min(10.0, max(0.0, timeout - waited)))


def rounds(count: int, arms: Sequence) -> Iterator[Tuple[int, list]]:
    """(round, arms in that round's order): every round runs every arm once, the order rotated by
    one each round, so drift in the machine's speed spreads over all arms instead of one."""
    for r in range(count):
        k = r % len(arms)
        yield r, [*arms[k:], *arms[:k]]


def in_child(fn: Callable[[], dict]) -> dict:
    """Run ``fn`` in a forked process and return its result (or the error it raised). A parent that
    has imported everything and prepared the data but run no torch kernels gives each child a fresh
    OpenMP pool and heap: VmHWM, reset in the child, then measures ``fn`` alone (on top of the
    baseline every child shares). Interrupting the parent kills the child."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the arm
        os.close(read)
        code = 0
        try:
            out = fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the parent, the run goes on
            out, code = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}, 1
        try:
            with os.fdopen(write, "wb") as f:
                pickle.dump(out, f)
        finally:
            os._exit(code)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as f:
            data = f.read()
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): the arm must not outlive the run
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    _, status = os.waitpid(pid, 0)
    if not data:
        return {"error": f"the arm's process died (wait status {status})"}
    return pickle.loads(data)


def summarize(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# --- provenance and the report --------------------------------------------------------------------

def git(*args: str) -> Optional[str]:
    """``git ARGS`` in the checkout: its output, or None outside one (or without git)."""
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def dirty() -> bool:
    """Whether tracked files differ from HEAD."""
    return bool(git("status", "--porcelain", "--untracked-files=no"))


def git_head() -> Optional[str]:
    """HEAD's commit, ``-dirty`` appended when tracked files differ from it; None outside a checkout."""
    head = git("rev-parse", "HEAD")
    return head + ("-dirty" if dirty() else "") if head else None


def measured_files() -> Dict[str, Path]:
    """The files of :data:`MEASURED` that exist here, by their path from the checkout's root."""
    found = {}
    for pattern in MEASURED:
        for path in sorted(REPO.glob(pattern)):
            found[path.relative_to(REPO).as_posix()] = path
    return found


def provenance() -> dict:
    """Which code ran: git head, dirty flag, and the first 16 hex digits of each measured file's sha256."""
    from clpd.training.checkpoint import sha256_file

    return {"git_head": git("rev-parse", "HEAD"), "dirty": dirty(),
            "sha256": {name: sha256_file(path)[:16] for name, path in measured_files().items()}}


def versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def loadavg() -> Optional[float]:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine(where: Optional["Placement"] = None) -> dict:
    """A report's ``environment``: versions, CPUs, processor and torch threads (clpd.environment's
    probe), the 1-minute load, the commit; with ``where``, the device and precision (and the GPU's
    name, CUDA version and memory)."""
    probe = environment(where.device if where is not None else torch.device("cpu"))
    env = {**versions(), "cpus": os.cpu_count(), "processor": probe["cpu"], "threads": probe["threads"],
           "loadavg_1m": loadavg(), "git_head": git_head()}
    if where is not None:
        env.update(device=probe["device"], precision=where.precision)
        if where.cuda:
            env.update(device_name=torch.cuda.get_device_name(where.device), cuda=torch.version.cuda,
                       device_memory_gib=torch.cuda.get_device_properties(where.device).total_memory / 2**30)
    return env


def write_report(path: Optional[Path], report: dict, *, indent: int = 1, label: str = "wrote") -> None:
    """``report`` as JSON at ``path`` (nothing without one), and a line saying so."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=indent, default=str) + "\n")
    print(f"{label} {path}")


# --- models and placement -------------------------------------------------------------------------

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
    "smollm2-135m": Shape(576, 30, 9, 3, 1536, 49152, tied=True),
    "tiny": Shape(128, 4, 4, 4, 384, 100, tied=True),
    "tiny-teacher": Shape(128, 5, 4, 4, 384, 100, tied=True),
}


def parse_shape(text: str) -> Shape:
    """A preset name or ``h,l,heads,kv,ffn,vocab`` (tied embeddings)."""
    if text in PRESETS:
        return PRESETS[text]
    try:
        values = [int(p) for p in text.split(",")]
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


def build_model(shape: Shape, dtype: torch.dtype, device: torch.device, seq_len: int) -> torch.nn.Module:
    """A random-weight Qwen2 of ``shape`` (``Qwen2Config`` + ``from_config``: nothing is downloaded)."""
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


def qwen_model(shape: Shape, seq_len: int, seed: int, dtype: torch.dtype = torch.float32,
               device: torch.device = torch.device("cpu")) -> torch.nn.Module:
    """:func:`build_model` after seeding torch with ``seed``."""
    torch.manual_seed(seed)
    return build_model(shape, dtype, device, seq_len)


@dataclass
class Placement:
    """Where and in what precision a benchmark runs, as clpd trains: on CUDA with bf16, the student's
    weights fp32 under ``torch.autocast("cuda", dtype=torch.bfloat16)``, the teacher's weights in bf16
    (clpd.teachers.live.teacher_dtype), a store built under the same autocast; fp32 everywhere else."""
    device: torch.device
    precision: str  # fp32 | bf16
    autocast_dtype: Optional[torch.dtype]
    teacher_dtype: torch.dtype

    @classmethod
    def of(cls, device: torch.device, precision: str) -> "Placement":
        bf16 = precision == "bf16"
        return cls(device, precision, torch.bfloat16 if bf16 else None, torch.bfloat16 if bf16 else torch.float32)

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


def report_args(args: argparse.Namespace) -> dict:
    """``vars(args)`` for a report: shapes as dicts, the subcommand's function left out."""
    from dataclasses import asdict

    return {k: asdict(v) if isinstance(v, Shape) else v for k, v in vars(args).items() if k != "func"}
