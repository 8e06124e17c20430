#!/usr/bin/env python
"""clpd's training loop against TRL's GKDTrainer on the same work, in one run, interleaved.

Issue 17 asks for clpd's loop to be measured against TRL "in one session, interleaved, same shapes,
same data, same batch". This script does that on the CPU and prints, per arm, the median REAL
tokens/s over the rounds, its min-max, and its ratio to the best TRL arm's median.

The same work in every arm:

* Models: a from-scratch Llama student shaped like ``conf/student/micro.yaml`` and a live teacher
  shaped like the ``large`` rung of ``conf/teachers/arith_tiny.yaml``, built once by
  ``clpd.models.load.load_model`` with clpd's character tokenizer (seeded, random weights: timing only),
  saved with ``save_pretrained`` and loaded from those folders by every arm, so all arms start
  from identical weights. fp32 on the CPU, ``torch.set_num_threads(--threads)`` (2) in every arm.
* Data: clpd's ``arith`` training problems encoded by ``clpd.data.prompts.encode_problems``
  (``input_ids``, ``labels`` with -100 on the prompt). Step s of every arm trains on the same 32
  examples: ``clpd.curriculum.sampler.Sampler(range(n), 32, seed).batch(s)``. TRL is given these
  token ids and labels as they are (a pre-tokenized dataset, one row per example, in step order, so
  ``train_sampling_strategy="sequential"`` hands each optimizer step exactly clpd's batch of that
  step) and a collator that right-pads them the way clpd's ``collate`` does (pad id, -100 labels),
  with the attention mask a Trainer's collators give (clpd's ``collate`` gives none: with right
  padding in a causal model it changes only the outputs at padding). TRL shifts inside
  ``compute_loss``; clpd shifts in ``collate``: both score the same (token, next token) pairs.
* Loss: forward KL(teacher || student) over answer tokens, temperature 1, no CE term, summed and
  divided by the answer tokens of the whole optimizer step. clpd: ``distill_loss(loss="forward_kl",
  alpha=0)``. TRL: ``GKDConfig(lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0)``: lmbda=0 is
  off-policy (``training_step`` generates only when ``random.random() <= lmbda``), beta=0 is
  ``F.kl_div(student_logp, teacher_logp, log_target=True)`` = KL(teacher || student), and the
  Trainer passes ``num_items_in_batch`` (the step's answer tokens) so GKD divides by the same count.
* Optimizer: AdamW, the same lr, betas (0.9, 0.95), eps 1e-8, weight decay 0.01 on matrices only
  (clpd's groups; transformers excludes norms and biases: the same split for a Llama), gradient
  clipping at 1.0, a constant learning rate (no warmup) in both, the same number of optimizer
  steps, 32 examples per step (per_device_train_batch_size x gradient_accumulation_steps = 32).
  TRL keeps its own default optimizer, ``adamw_torch_fused`` (clpd uses fused AdamW on CUDA only).
  As a check that the arms did the same work, every arm ends by scoring one fixed probe batch
  with its trained student (forward KL to the teacher per answer token, ``probe_kd`` in the JSON):
  all arms agree to float noise.

What is timed: only optimizer steps. Model building, data preparation and Trainer construction are
outside the clock, and the first ``--warmup`` steps of every arm are excluded. clpd: from the
start of step ``warmup`` (its ``Batches.step`` call) to the return of ``clpd.training.loop.train``. TRL: from
``on_step_end`` of step ``warmup`` to ``on_step_end`` of the last step (a ``TrainerCallback``). Both
windows hold the batching/collation of those steps, and nothing else that clpd or TRL would not do
in a real run with logging, saving and evaluation off (clpd's also holds its one log line at the last
step, its rich progress bar's refresh thread and the final state snapshot; TRL's holds its per-step
FLOP and token counting and callbacks).

Metrics per arm and round: REAL tokens/s = tokens the student reads that predict a next token
(``len(input_ids) - 1`` per example, clpd's ``read_token_count``; the same count for every arm, as
every arm trains on the same examples) per second; padded positions/s = the positions the student
actually computes (rows x width of each padded micro-batch, TRL's one column wider as it shifts
after the forward; the row length of a packed one); median step time; peak RSS. Each arm runs in
its own process forked from this one (``os.fork``, after the imports and the data, before any torch
work), so peak RSS (``VmHWM``, reset at the fork) is the arm's own, and arms do not share allocator
or thread-pool state. A round runs every arm once, the order rotated by one each round.

Other work on the machine: with 2 threads on 2 cores, another busy process slows an arm several
times over (each OpenMP region waits for its descheduled thread), far more than the differences
measured here. Every run therefore records, over its timed window, its own CPU time per wall second
(``cpu_per_wall``, at most ``--threads``) and the CPU cores the rest of the machine used
(``others_cores``, from /proc/stat). A run during which others used more than ``--max-others``
cores is run again (``--retries`` times at most) and the quietest attempt is kept, the same rule for
every arm; the discarded attempts stay in the JSON. Before each run the script also waits (up to
``--quiet-wait`` seconds) until the rest of the machine is that quiet. The table gives the most any
kept run of an arm saw ("others"): read a row whose value is well above 0 as measured on a busy
machine.

TRL configuration, and why (``--arms``; the default set is every arm this checkout can run but
``clpd_packed_ga1``):

* ``trl_ga1``: per_device_train_batch_size=32, gradient_accumulation_steps=1: one padded batch of the
  step's 32 examples, exactly clpd's ``clpd_ga1`` shapes.
* ``trl_ga4_sorted``: 8 x 4, each step's 32 examples given sorted by length (sequential sampler), so
  its micro-batches are exactly clpd's default ones (``clpd_ga4``): same shapes.
* ``trl_ga4_rebalance``: 4 micro-batches of 8 examples on average, transformers' own ``BatchRebalanceSampler`` (the
  ``train_sampling_strategy="batch_rebalance"`` sampler: sorts the effective batch by length and
  cuts it into cost-balanced micro-batches of variable size) with ``shuffle=False``, so each step
  still gets clpd's batch of that step; this is TRL's own padding-reducing layout.
* Not used: ``group_by_length`` (LengthGroupedSampler) and a random sampler change which examples a
  step sees, so the work would not be the same; SFT's ``padding_free``/``packing`` are not available
  to GKDTrainer (padding-free refuses a custom collator, GKD's ``compute_loss`` passes no
  ``position_ids``, and GKD skips the dataset preparation that packs); gradient checkpointing is off
  (SFTConfig turns it on by default), bf16 off (SFTConfig's default turns it on), logging, saving
  and evaluation off, ``report_to=[]``, 0 dataloader workers, no pinned memory.

clpd arms: ``clpd_ga1`` (grad_accum=1), ``clpd_ga4`` (grad_accum=4, the default: the step's batch
sorted by length, 4 micro-batches of 8), and, once clpd's loop has padding-free micro-batches
(``Batches.packed``/``TrainerConfig.packing``, ``micro_batch_tokens``), ``clpd_packed_ga4`` and
``clpd_packed_tok`` (``micro_batch_tokens=--micro-batch-tokens``), and on request ``clpd_packed_ga1``
(one packed row of all 32 examples: with sdpa or eager attention on a CPU the block-diagonal mask is
computed in full, quadratic in the row's length, so it is left out of the default set). Arms whose
fields do not exist yet are reported as unavailable, not run; packed arms are also skipped when
``clpd.data.batching.packing_is_exact`` says the student's attention does not keep packed examples
apart.

TRL is not a dependency of clpd: install it into the same environment for this script only
(``pip install trl``; check it leaves torch and transformers as they are).

Run timed measurements under the shared lock, e.g.::

    flock /tmp/clpd-measure.lock python scripts/bench_trl.py --out /tmp/bench_trl.json   # 7 arms x 3 rounds x 21 steps
    python scripts/bench_trl.py --steps 2 --rounds 1 --train-limit 200 --arms clpd_ga4,trl_ga4_sorted   # a smoke test
    flock /tmp/clpd-measure.lock python scripts/bench_trl.py --shapes smollm2 --batch-size 16 --steps 4 \
        --arms clpd_ga1,clpd_ga4,trl_ga1,trl_ga4_sorted,trl_ga4_rebalance   # SmolLM2-135M shapes: ~20 minutes

The default size (20 timed steps, 3 rounds, 7 arms) takes about 10 minutes on 2 idle cores; the
time grows with whatever else runs on the machine: the JSON records the 1-minute load average and
each arm's CPU time per wall second (``cpu_per_wall``, at most ``--threads``) to show it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import pickle
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked arms: no tokenizer thread pool to inherit
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental (TRL >= 0.2x)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout that is not pip-installed

import torch  # noqa: E402

from clpd.config.schema import BenchmarkConfig, TrainerConfig
from clpd.config.enums import Device, LrSchedule, Precision
from clpd.config.model import ModelConfig
from clpd.curriculum.sampler import Sampler  # noqa: E402
from clpd.data import load_problems  # noqa: E402
from clpd.data.batching import collate  # noqa: E402
from clpd.data.prompts import encode_problems
from clpd.data.records import IGNORE_INDEX
from clpd.losses.distill import distill_loss
from clpd.models.tokenizer import build_char_tokenizer  # noqa: E402

TRL_MISSING = ("TRL is not installed. It is not a dependency of clpd; install it into this environment for this "
               "benchmark only: pip install trl (then check that torch and transformers kept their versions, e.g. "
               "pip install trl -c <(pip freeze | grep -v '^-e'))")

# The (student, teacher) shapes of --shapes. Random weights either way: the numbers are speed only.
SHAPES = {
    # conf/student/micro.yaml and arith_tiny's "large": the default job's models, a 100-row vocabulary
    "arith": (dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=192),
              dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384)),
    # student=smollm2_cut6 and teachers=smollm2 (SmolLM2-135M-Instruct's config: 49,152 output rows,
    # tied): a real small LM's shapes, where the output layer and the loss over the vocabulary weigh
    # as much as the blocks. The data stays clpd's character-level arith ids (all below 100).
    "smollm2": (dict(hidden_size=576, num_layers=6, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                     vocab_size=49152, max_position_embeddings=8192),
                dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                     vocab_size=49152, max_position_embeddings=8192)),
}


# --- arms ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # "clpd" | "trl"
    grad_accum: int = 1
    packed: bool = False
    micro_batch_tokens: bool = False  # clpd: cut micro-batches by --micro-batch-tokens
    layout: str = "sorted"  # trl: "sorted" (sequential, step batch sorted by length) | "rebalance"
    what: str = ""


ARMS = [
    Arm("clpd_ga1", "clpd", 1, what="clpd loop, grad_accum=1: one padded batch of 32"),
    Arm("clpd_ga4", "clpd", 4, what="clpd loop, grad_accum=4 (default): batch sorted by length, 4 padded micro-batches of 8"),
    Arm("clpd_packed_ga4", "clpd", 4, packed=True, what="clpd loop, packing=true, grad_accum=4: 4 packed rows of 8 examples"),
    Arm("clpd_packed_ga1", "clpd", 1, packed=True, what="clpd loop, packing=true, grad_accum=1: one packed row of 32 examples"),
    Arm("clpd_packed_tok", "clpd", 1, packed=True, micro_batch_tokens=True,
        what="clpd loop, packing=true, micro_batch_tokens=N: packed rows of at most N tokens"),
    Arm("trl_ga1", "trl", 1, what="TRL GKDTrainer, 32 x 1: one padded batch of 32"),
    Arm("trl_ga4_sorted", "trl", 4, what="TRL GKDTrainer, 8 x 4, step batch sorted by length: clpd_ga4's micro-batches"),
    Arm("trl_ga4_rebalance", "trl", 4, layout="rebalance",
        what="TRL GKDTrainer, 4 micro-batches from transformers' BatchRebalanceSampler (shuffle off)"),
]
ARM_NAMES = [a.name for a in ARMS]
# Run only when asked (--arms all, or by name): one packed row of all 32 examples makes sdpa/eager
# attend over the whole row (a block-diagonal mask, computed in full), quadratic in the row's
# length: about 6,300 tokens here, several times slower than any other arm.
OPT_IN = ("clpd_packed_ga1",)


def field_names(cls) -> set:
    return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def packing_support() -> Dict[str, bool]:
    """What this checkout's loop offers: padding-free micro-batches and micro-batches by tokens.
    Checked on the dataclasses, so the script runs before (and after) those fields exist."""
    from clpd.training.batches import Batches

    batches, trainer = field_names(Batches), field_names(TrainerConfig)
    return {"packed": "packed" in batches, "micro_batch_tokens": "micro_batch_tokens" in batches,
            "trainer_packing": "packing" in trainer, "trainer_micro_batch_tokens": "micro_batch_tokens" in trainer}


def unavailable_reason(arm: Arm, support: Dict[str, bool], trl_ok: bool) -> Optional[str]:
    if arm.kind == "trl" and not trl_ok:
        return "trl is not installed"
    if arm.packed and not support["packed"]:
        return "clpd.training.loop.Batches has no 'packed' field yet (padding-free micro-batches not in this checkout)"
    if arm.micro_batch_tokens and not support["micro_batch_tokens"]:
        return "clpd.training.loop.Batches has no 'micro_batch_tokens' field yet"
    return None


def trl_version() -> Optional[str]:
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def preimport(trl_too: bool) -> None:
    """Import what the arms use before forking them (imports run no torch kernels), so no arm
    pays for them and every arm starts from the same interpreter state."""
    import rich.console  # noqa: F401

    import clpd.training.loop  # noqa: F401
    import clpd.models.load  # noqa: F401
    import clpd.teachers.live  # noqa: F401

    if trl_too:
        import datasets  # noqa: F401
        import transformers.trainer  # noqa: F401
        from trl.experimental.gkd import GKDTrainer  # noqa: F401


# --- measuring -----------------------------------------------------------------------------------

def peak_rss_mib(key: str = "VmHWM") -> float:
    """VmHWM (peak RSS; reset at the start of each arm) or VmRSS of this process in MiB; ru_maxrss
    where /proc has none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


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


def others_cores_now(seconds: float = 2.0) -> float:
    """CPU cores the rest of the machine uses now (this process sleeps meanwhile)."""
    busy, own = busy_cpu_s(), time.process_time()
    time.sleep(seconds)
    return max(0.0, busy_cpu_s() - busy - (time.process_time() - own)) / seconds


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


def in_child(fn: Callable[[], dict]) -> dict:
    """Run ``fn`` in a forked process and return its result (or the error it raised). The parent
    has imported everything and prepared the data but run no torch kernels, so the child starts
    with a fresh OpenMP pool and heap; VmHWM then measures the arm alone (on top of the shared
    baseline, the same for every arm)."""
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


# --- the work --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Work:
    """What every arm does: the examples, each step's batch, the models' folders."""
    examples: List[dict]
    step_batches: List[List[int]]  # example indices of each optimizer step (warm-up included)
    probe: List[int]  # a fixed batch every arm scores after training (the same-work check)
    pad_id: int
    vocab: int
    student_dir: str
    teacher_dir: str
    args: argparse.Namespace


def step_examples(work: Work, step: int, sort: bool = True) -> List[dict]:
    batch = [work.examples[i] for i in work.step_batches[step]]
    return sorted(batch, key=lambda e: len(e["input_ids"])) if sort else batch  # stable, as clpd sorts


def real_tokens(examples: List[dict]) -> int:
    return sum(len(e["input_ids"]) - 1 for e in examples)


def build_models(student_dir: str, teacher_dir: str, seed: int, threads: int, shapes: str) -> dict:
    """Child: the student and teacher, random weights, saved once for every arm."""
    from transformers.utils import logging as hf_logging

    from clpd.models.load import count_parameters, load_model

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    tokenizer = build_char_tokenizer()
    out = {}
    student_shape, teacher_shape = SHAPES[shapes]
    for name, shape, folder, offset in (("student", student_shape, student_dir, 0), ("teacher", teacher_shape, teacher_dir, 1)):
        torch.manual_seed(seed + offset)
        model = load_model(ModelConfig(name=name, **{"max_position_embeddings": 512, **shape}), tokenizer)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[f"{name}_params"] = count_parameters(model)
        out[f"{name}_attn"] = model.config._attn_implementation
        out[f"{name}_vocab_rows"] = model.get_output_embeddings().weight.shape[0]
    try:
        from clpd.data.batching import packing_is_exact
    except ImportError:
        out["packing_exact"] = None
    else:
        out["packing_exact"] = bool(packing_is_exact(load_model(ModelConfig(name="s", path=student_dir), tokenizer)))
    return out


def probe_kd(student: torch.nn.Module, teacher: torch.nn.Module, work: Work) -> float:
    """Forward KL to the teacher per answer token on a fixed probe batch (another draw of the
    pool): equal across arms (to float noise) when they made the same updates."""
    batch = collate([work.examples[i] for i in work.probe], work.pad_id)
    student.eval()
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"]).logits
        t = teacher(input_ids=batch["input_ids"]).logits
        terms = distill_loss(s, t, batch["targets"], loss="forward_kl", alpha=0.0, vocab_size=work.vocab)
    answers = int((batch["targets"] != IGNORE_INDEX).sum())
    return float(terms.total) / max(answers, 1)


def trainer_config(work: Work, arm: Arm) -> TrainerConfig:
    a = work.args
    extra = {}
    names = field_names(TrainerConfig)
    if "packing" in names:
        extra["packing"] = arm.packed
    if "micro_batch_tokens" in names and arm.micro_batch_tokens:
        extra["micro_batch_tokens"] = a.micro_batch_tokens
    return TrainerConfig(max_steps=len(work.step_batches), batch_size=a.batch_size, grad_accum=arm.grad_accum, lr=a.lr,
                         lr_schedule=LrSchedule.constant, warmup_steps=0, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95,
                         grad_clip=1.0, log_every=len(work.step_batches) + 1, save=False, eval_at_end=False,
                         precision=Precision.fp32, device=Device.cpu, num_threads=a.threads, **extra)


def run_clpd(work: Work, arm: Arm) -> dict:
    """Child: clpd's loop, called directly, on the step batches of ``work``."""
    from rich.console import Console

    import clpd.training.loop as loop
    from clpd.models.load import load_model
    from clpd.teachers.live import TeacherPool

    tokenizer = build_char_tokenizer()
    student = load_model(ModelConfig(name="student", path=work.student_dir), tokenizer)
    teacher_spec = ModelConfig(name="teacher", path=work.teacher_dir)
    table = work.step_batches

    class StepSampler(Sampler):  # the step batches of ``work``, whatever clpd's sampler would draw
        def batch(self, step, at=None):
            return list(table[step])

    bounds: List[tuple] = []  # clock() at the start of each step, then at the end of the last
    positions: List[int] = []
    clpd_tokens: List[int] = []
    micro_batches: List[int] = []

    class TimedBatches(loop.Batches):
        def step(self, *args, **kwargs):
            bounds.append(clock())
            out = super().step(*args, **kwargs)
            positions.append(sum(int(mb["input_ids"].numel()) for mb in out.micro_batches))
            clpd_tokens.append(int(out.tokens))
            micro_batches.append(len(out.micro_batches))
            return out

    layout = {}
    names = field_names(loop.Batches)
    if "packed" in names:
        layout["packed"] = arm.packed
    if "micro_batch_tokens" in names and arm.micro_batch_tokens:
        layout["micro_batch_tokens"] = work.args.micro_batch_tokens
    batches = TimedBatches(work.examples, StepSampler(range(len(work.examples)), work.args.batch_size, 0),
                           work.pad_id, **layout)
    cfg = trainer_config(work, arm)
    loss_fn = functools.partial(distill_loss, loss="forward_kl", alpha=0.0, vocab_size=work.vocab)
    teachers = TeacherPool([teacher_spec], tokenizer, device=torch.device("cpu"), dtype=torch.float32)
    supervision = loop.Supervision(loss_fn, teachers, schedule=lambda step: 0)
    outputs = loop.Outputs(None, Console(quiet=True))
    result = loop.train(student, batches, cfg, supervision, outputs, device=torch.device("cpu"))
    bounds.append(clock())  # step k ends where step k+1 starts; the last one when train() returns
    teacher, _ = teachers.get(0)
    return {"bounds": bounds, "positions": positions, "clpd_tokens": clpd_tokens,
            "micro_batches": micro_batches, "final_loss": result.final_loss, "probe_kd": probe_kd(student, teacher, work)}


def run_trl(work: Work, arm: Arm) -> dict:
    """Child: TRL's GKDTrainer, off-policy forward KL, on the step batches of ``work``."""
    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_pt_utils import BatchRebalanceSampler
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from clpd.models.load import load_model

    transformers.logging.set_verbosity_error()
    a = work.args
    tokenizer = build_char_tokenizer()
    student = load_model(ModelConfig(name="student", path=work.student_dir), tokenizer)
    teacher = load_model(ModelConfig(name="teacher", path=work.teacher_dir), tokenizer)
    teacher.requires_grad_(False)
    teacher.eval()

    # One row per example, in step order; "sorted": each step's batch sorted by length, so 8 x 4
    # micro-batches are clpd's. The rebalance sampler sorts each step's 32 itself.
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"]}
            for step in range(len(work.step_batches)) for e in step_examples(work, step, sort=arm.layout == "sorted")]
    lengths = [len(r["input_ids"]) for r in rows]
    positions: List[int] = []  # per micro-batch, in the order the Trainer collates them

    def collate_trl(features: List[dict]) -> Dict[str, torch.Tensor]:
        """clpd's collate before its shift, plus an attention mask: right-padded ids, -100 labels (TRL shifts)."""
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), work.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            mask[row, :n] = 1
        positions.append(ids.numel())
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    bounds: List[Optional[tuple]] = [None]  # the start of step 0 is not observed; step k >= 1 starts where k-1 ends

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            bounds.append(clock())

    per_device = a.batch_size // arm.grad_accum
    config = GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), use_cpu=True, seed=a.seed,
        max_steps=len(work.step_batches), per_device_train_batch_size=per_device,
        gradient_accumulation_steps=arm.grad_accum, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False,
        bf16=False, fp16=False, gradient_checkpointing=False,  # both on by SFTConfig's defaults
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, dataloader_drop_last=False,
        train_sampling_strategy="sequential" if arm.layout == "sorted" else "batch_rebalance",
        remove_unused_columns=False,
        # transformers 5 renamed gradient_checkpointing (a deprecated alias, which warns when it is the one set)
        **({"activation_checkpointing": False} if "activation_checkpointing" in field_names(GKDConfig) else {}),
    )

    class StepOrderGKD(GKDTrainer):
        def _get_train_sampler(self, train_dataset=None):
            if arm.layout == "rebalance":  # transformers' own sampler, without its shuffle: clpd's step batches
                return BatchRebalanceSampler(lengths, effective_batch_size=a.batch_size, dp_size=1,
                                             grad_accum=arm.grad_accum, shuffle=False, drop_last=False)
            return super()._get_train_sampler(train_dataset)

    # A datasets.Dataset, as TRL requires (it refuses a list); pre-tokenized, so SFT's preparation is skipped.
    trainer = StepOrderGKD(model=student, teacher_model=teacher, args=config, data_collator=collate_trl,
                           train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[StepClock()])
    trainer.remove_callback(PrinterCallback)  # with tqdm off it prints the end-of-training summary line
    trainer.train()
    shutil.rmtree(config.output_dir, ignore_errors=True)  # nothing is saved there (save_strategy="no")
    ga = arm.grad_accum
    step_positions = [sum(positions[k * ga:(k + 1) * ga]) for k in range(len(work.step_batches))]
    info = {"optimizer": type(trainer.optimizer).__name__ if trainer.optimizer is not None else None,
            "optim": str(config.optim), "optimizer_defaults": {k: str(v) for k, v in trainer.optimizer.defaults.items()},
            "num_items_in_batch_used": bool(trainer.model_accepts_loss_kwargs),
            "activation_checkpointing": bool(getattr(trainer.model, "is_activation_checkpointing")
                                             if hasattr(type(trainer.model), "is_activation_checkpointing")
                                             else getattr(trainer.model, "is_gradient_checkpointing", False)),
            "bf16": bool(config.bf16), "lmbda": config.lmbda, "beta": config.beta, "seq_kd": config.seq_kd}
    return {"bounds": bounds, "positions": step_positions, "micro_batches": [ga] * len(work.step_batches),
            "probe_kd": probe_kd(trainer.model, teacher, work), "trl": info}


def run_arm(work: Work, arm: Arm) -> dict:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars of from_pretrained
    torch.set_num_threads(work.args.threads)
    reset = reset_peak_rss()
    rss_start = peak_rss_mib("VmRSS")  # inherited from the parent (imports, data): the same in every arm
    load_before = os.getloadavg()[0]
    out = run_clpd(work, arm) if arm.kind == "clpd" else run_trl(work, arm)
    w = work.args.warmup
    bounds = out.pop("bounds")  # len = steps + 1: the start of every step, then the end of the last
    assert len(bounds) == len(work.step_batches) + 1, (len(bounds), len(work.step_batches))
    timed = [b[0] - a[0] for a, b in zip(bounds[w:-1], bounds[w + 1:])]
    first, last = bounds[w], bounds[-1]
    seconds = last[0] - first[0]
    cpu_seconds = last[1] - first[1]
    others = max(0.0, (last[2] - first[2]) - cpu_seconds) / seconds  # cores the rest of the machine used
    tokens = sum(real_tokens(step_examples(work, s)) for s in range(w, len(work.step_batches)))
    positions = sum(out["positions"][w:])
    out.update(seconds=seconds, real_tokens=tokens, padded_positions=positions, real_tok_s=tokens / seconds,
               positions_s=positions / seconds, median_step_s=statistics.median(timed),
               cpu_per_wall=cpu_seconds / seconds, others_cores=others, step_s=timed,
               peak_rss_mib=peak_rss_mib(), peak_rss_reset=reset, rss_start_mib=rss_start,
               loadavg_1m=[load_before, os.getloadavg()[0]],
               threads=torch.get_num_threads())
    return out


# --- report ----------------------------------------------------------------------------------------

# clpd arms and the TRL arm with the same micro-batch shapes
SAME_SHAPES = {"clpd_ga1": "trl_ga1", "clpd_ga4": "trl_ga4_sorted"}


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
        rounds = s.get("round_ratios_to_best_trl") or []
        spread = f"{min(rounds):.2f}-{max(rounds):.2f}" if rounds else "-"
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


def provenance() -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    files = ["clpd/loop.py", "clpd/data/batching.py", "clpd/config.py", "clpd/losses.py"]
    return {"git_head": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "sha256": {f: hashlib.sha256((REPO / f).read_bytes()).hexdigest()[:16] for f in files if (REPO / f).exists()}}


# --- main ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per arm and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first, in every arm (>= 1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every arm once, the order rotated")
    p.add_argument("--arms", default="default",
                   help=f"'default' (all but {', '.join(OPT_IN)}), 'all', or comma-separated names from: "
                        f"{', '.join(ARM_NAMES)}")
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problems = [f"--{k.replace('_', '-')} must be >= 1" for k in ("steps", "rounds", "batch_size", "threads")
                if getattr(args, k) < 1]
    if args.retries < 0:
        problems.append("--retries must be >= 0")
    if args.warmup < 1:  # TRL's first step has no start mark (the clock is on_step_end)
        problems.append("--warmup must be >= 1")
    wanted = (ARM_NAMES if args.arms == "all" else [n for n in ARM_NAMES if n not in OPT_IN] if args.arms == "default"
              else [a.strip() for a in args.arms.split(",") if a.strip()])
    unknown = [a for a in wanted if a not in ARM_NAMES]
    if unknown:
        problems.append(f"--arms: unknown {unknown}; choose from {', '.join(ARM_NAMES)}")
    arms = [a for a in ARMS if a.name in wanted]
    if any(args.batch_size % a.grad_accum for a in arms):
        problems.append(f"--batch-size {args.batch_size} must divide by every arm's grad_accum (4)")
    if problems:
        parser.error("; ".join(problems))

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
    limit = args.train_limit
    kept, examples, counts = encode_problems(load_problems(BenchmarkConfig(), "train", limit), tokenizer,
                                             chat_template=False, max_len=512)
    total = args.warmup + args.steps
    sampler = Sampler(range(len(examples)), args.batch_size, seed=args.seed)
    step_batches = [sampler.batch(s) for s in range(total)]
    probe = Sampler(range(len(examples)), 32, seed=args.seed + 1).batch(0)  # a fixed batch of another draw
    if any(a.micro_batch_tokens for a in arms) and args.micro_batch_tokens < max(len(e["input_ids"]) for e in examples):
        parser.error(f"--micro-batch-tokens {args.micro_batch_tokens} is smaller than the longest example "
                     f"({max(len(e['input_ids']) for e in examples)} tokens)")
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


def measure(args: argparse.Namespace, arms: List[Arm], skipped: Dict[str, str], support: Dict[str, bool], work: Work,
            prep_s: float, lengths: List[int], counts: Dict[str, int]) -> int:
    examples = work.examples
    models = in_child(lambda: build_models(work.student_dir, work.teacher_dir, args.seed, args.threads, args.shapes))
    if "error" in models:
        print(models.get("traceback", models["error"]), file=sys.stderr)
        return 1
    if models.get("packing_exact") is False:
        for a in [a for a in arms if a.packed]:
            skipped[a.name] = "packing_is_exact(student) is False: the attention does not keep packed examples apart"
        arms = [a for a in arms if not a.packed]

    print(f"clpd vs TRL {trl_version()} GKDTrainer, torch {torch.__version__}, transformers "
          f"{__import__('transformers').__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads {args.threads} in every arm", flush=True)
    print(f"student {models['student_params'] / 1e6:.2f}M params, teacher {models['teacher_params'] / 1e6:.2f}M "
          f"({models['student_attn']} attention), fp32; {len(examples)} arith examples, batch {args.batch_size}, "
          f"{args.warmup} warm-up + {args.steps} timed steps per arm, {args.rounds} rounds; example length "
          f"{min(lengths)}-{max(lengths)} (mean {statistics.mean(lengths):.0f}); data prep {prep_s:.1f}s", flush=True)
    for name, why in skipped.items():
        print(f"  skipped {name}: {why}", flush=True)

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM also ends the running arm (in_child)
    results: Dict[str, List[dict]] = {a.name: [] for a in arms}
    started = time.perf_counter()
    for r in range(args.rounds):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for arm in order:
            attempts = []
            for attempt in range(args.retries + 1):  # again while the rest of the machine took CPU from the arm
                waited, before = wait_quiet(args.max_others, args.quiet_wait) if args.quiet_wait > 0 else (0.0, None)
                if waited >= 5:
                    print(f"round {r + 1} {arm.name:<18} waited {waited:.0f}s for a quiet machine (others now "
                          f"{before:.2f} cores)", flush=True)
                out = in_child(lambda arm=arm: run_arm(work, arm))
                out.update(waited_s=waited, others_before=before)
                attempts.append(out)
                if "error" in out or out["others_cores"] <= args.max_others or attempt == args.retries:
                    break
                print(f"round {r + 1} {arm.name:<18} others used {out['others_cores']:.2f} cores "
                      f"(> --max-others {args.max_others}): {out['real_tok_s']:,.0f} real tok/s not kept, run again",
                      flush=True)
            out = min(attempts, key=lambda o: o.get("others_cores", float("inf")))  # the quietest attempt
            out = {**out, "round": r, "attempts": len(attempts),
                   "discarded": [{k: o.get(k) for k in ("real_tok_s", "others_cores", "error")} for o in attempts
                                 if o is not out]}
            results[arm.name].append(out)
            if "error" in out:
                print(f"round {r + 1} {arm.name}: FAILED {out['error']}", flush=True)
                if os.environ.get("BENCH_TRL_DEBUG"):
                    print(out.get("traceback", ""), file=sys.stderr)
            else:
                print(f"round {r + 1} {arm.name:<18} {out['real_tok_s']:>9,.0f} real tok/s  {out['positions_s']:>9,.0f} "
                      f"pos/s  step {1000 * out['median_step_s']:.1f} ms  peak {out['peak_rss_mib']:.0f} MiB  "
                      f"probe {out['probe_kd']:.5f}  cpu/wall {out['cpu_per_wall']:.2f}  others "
                      f"{out['others_cores']:.2f} cores{'  (BUSY)' if out['others_cores'] > args.max_others else ''}",
                      flush=True)
    wall = time.perf_counter() - started

    summary = summarize(results, arms)
    print("\nmedians over rounds; 'per round': the arm's tok/s over the best TRL arm's in the same round, min-max; "
          "'others': the most CPU cores the rest of the machine used during one of the arm's kept runs")
    print(table(summary, arms))
    if summary:
        trl = [k for k in summary if k.startswith("trl_")]
        clpd = [k for k in summary if k.startswith("clpd_")]
        if trl and clpd:
            best_clpd = max(clpd, key=lambda k: summary[k]["median_real_tok_s"])
            print(f"\nbest clpd arm {best_clpd}: {summary[best_clpd]['ratio_to_best_trl']:.2f}x the best TRL arm "
                  f"({summary[best_clpd]['best_trl']}) in median real tokens/s; medians of {args.rounds} rounds, "
                  f"{wall:.0f}s of arms")
    if args.out is not None:
        report = {"command": sys.argv, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                               "trl": trl_version(), "python": platform.python_version()},
                  "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
                  "clpd": provenance(), "support": support, "models": models, "skipped": skipped,
                  "arms": {a.name: dataclasses.asdict(a) for a in arms}, "summary": summary, "runs": results,
                  "wall_s": wall, "data": {"examples": len(examples), "dropped": counts["dropped"],
                                           "length_min": min(lengths), "length_max": max(lengths),
                                           "length_mean": statistics.mean(lengths)}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")
    return 1 if any("error" in r for runs in results.values() for r in runs) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the running arm was stopped with it
        print("interrupted", file=sys.stderr)
        sys.exit(130)
