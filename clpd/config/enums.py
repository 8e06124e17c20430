"""The allowed values of the config's choice fields, as ``str`` enums: Hydra refuses any other value
with the list of allowed ones while it composes a config, before any job starts."""

from __future__ import annotations

from enum import Enum


class Arch(str, Enum):
    llama = "llama"
    qwen2 = "qwen2"


class BenchmarkName(str, Enum):
    arith = "arith"
    gsm8k = "gsm8k"
    svamp = "svamp"
    jsonl = "jsonl"  # the user's own file (JSONL, JSON, CSV, Parquet) or hub dataset, mapped by field names


class Precision(str, Enum):
    auto = "auto"  # bf16 on CUDA when supported, fp32 otherwise
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # CUDA only, with a GradScaler


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Overlong(str, Enum):
    """What happens to a training example longer than ``trainer.max_length``."""
    drop = "drop"  # leave it out
    truncate_left = "truncate_left"  # cut the prompt's left side (the answer is kept whole)


class LrSchedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class DistillLoss(str, Enum):
    """The token-level losses: cross-entropy on the gold solution (no teacher), or a divergence of
    clpd.losses.divergences (each function's docstring says what it is). A test keeps these names
    equal to ``LOSS_NAMES``, so a new divergence is one function, one entry there and one here."""
    sft = "sft"
    forward_kl = "forward_kl"
    reverse_kl = "reverse_kl"
    jsd = "jsd"
    skew_forward_kl = "skew_forward_kl"
    skew_reverse_kl = "skew_reverse_kl"
    tvd = "tvd"


class TeacherOutputs(str, Enum):
    live = "live"  # the teacher's forward at every step
    stored = "stored"  # top-k logits computed once per teacher and training set (clpd/teachers/store.py)


class Targets(str, Enum):
    gold = "gold"  # the benchmark's worked solutions
    teacher = "teacher"  # solutions the schedule's teacher wrote to the training prompts (sequence-level KD)


class Keep(str, Enum):
    all = "all"  # every teacher-written solution
    correct = "correct"  # only those whose final answer is the gold answer (rejection sampling)


class Schedule(str, Enum):
    strongest = "strongest"  # standard KD: the last (largest) teacher throughout
    weakest = "weakest"
    progressive = "progressive"  # teacher k during stage k
    fixed = "fixed"  # the teacher named by teachers.fixed


class StagePlacement(str, Enum):
    """Where the stages of a paced curriculum begin (clpd/curriculum/stages.py)."""
    pool = "pool"  # when the pool reaches each K-th of the ordered examples (stages of equal data)
    steps = "steps"  # at even steps (or the explicit boundaries), whatever the pool holds
    band = "band"  # when the pool first holds a problem of each difficulty band (levels split K ways)


class Pacing(str, Enum):
    none = "none"  # the whole training set is available from the first step
    linear = "linear"
    root = "root"  # competence-based, Platanios et al. 2019
    quadratic = "quadratic"
    exponential = "exponential"
    log = "log"
    geometric = "geometric"
    step = "step"  # baby steps: num_buckets buckets added cumulatively


class Order(str, Enum):
    easy_to_hard = "easy_to_hard"
    hard_to_easy = "hard_to_easy"  # the anti-curriculum control
    random = "random"  # no curriculum


class Difficulty(str, Enum):
    cot_steps = "cot_steps"  # reasoning steps of the gold solution
    cot_length = "cot_length"  # answer length in student tokens
    student_loss = "student_loss"  # loss of the initial student, one pass before training
    teacher_loss = "teacher_loss"  # loss of curriculum.teacher (a teacher of the ladder)
    teacher_cot_steps = "teacher_cot_steps"  # reasoning steps of curriculum.teacher's own solution (CoT-derived)
    rrf = "rrf"  # reciprocal rank fusion of curriculum.rrf_scorers (k = 60, as POCL)
    random = "random"  # a control
