"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore.

Hydra validates every value against these schemas while it composes the config, so a bad enum
value (``trainer.precision=fp8``) is refused with the allowed values before any job starts, even
inside a sweep. Rules that involve several fields live in ``__post_init__`` and run when a command
turns its DictConfig into these objects with :func:`to_object`, first thing, before any work.
All problems found by one check are reported together, each naming its key (as litgpt does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from clpd.errors import ClpdError
from clpd.losses import LOSS_NAMES
from clpd.models.sources import resolve_sources


class Arch(str, Enum):
    llama = "llama"
    qwen2 = "qwen2"


class BenchmarkName(str, Enum):
    arith = "arith"
    gsm8k = "gsm8k"
    svamp = "svamp"


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


# The token-level losses: "sft" (cross-entropy on the gold solution, no teacher) and every divergence
# of clpd/losses.py (forward_kl, reverse_kl, jsd, skew_forward_kl, skew_reverse_kl, tvd; each
# function's docstring says what it is). Built from the losses module, so a new divergence is
# allowed here, and by Hydra's validation, as soon as it is in ``DIVERGENCES``.
DistillLoss = Enum("DistillLoss", {name: name for name in LOSS_NAMES}, type=str)


class TeacherOutputs(str, Enum):
    live = "live"  # the teacher's forward at every step
    stored = "stored"  # top-k logits computed once per teacher and training set (clpd/teacher_store.py)


class Schedule(str, Enum):
    strongest = "strongest"  # standard KD: the last (largest) teacher throughout
    weakest = "weakest"
    progressive = "progressive"  # teacher k during stage k
    fixed = "fixed"  # the teacher named by teachers.fixed


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
    rrf = "rrf"  # reciprocal rank fusion of curriculum.rrf_scorers (k = 60, as POCL)
    random = "random"  # a control


def _check(problems: List[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def _raise_if(problems: List[str], section: str) -> None:
    if problems:
        raise ClpdError(f"invalid {section} config: " + "; ".join(problems))


@dataclass
class ModelConfig:
    """A student or teacher: a pretrained model (``path``) or a from-scratch architecture.

    ``path`` is a Hugging Face id or a local directory written by ``save_pretrained`` (a clpd
    checkpoint is one). Without ``path`` the model is built from the architecture fields with
    random weights, and the tokenizer is ``tokenizer`` (an id or directory) or, when that is
    empty too, clpd's character-level tokenizer.
    """

    name: str = "tiny"
    path: Optional[str] = None
    gguf_file: Optional[str] = None
    tokenizer: Optional[str] = None
    arch: Arch = Arch.llama
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # None: same as num_heads (no grouped-query attention)
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    tie_embeddings: bool = True
    # Output rows of a from-scratch model (None: the tokenizer's size). Real families pad them:
    # Qwen2.5 0.5B-3B have 151936 rows, 7B 152064, for a tokenizer of 151665 tokens.
    vocab_size: Optional[int] = None
    trust_remote_code: bool = False
    # Where this config sits, for error messages: "student." names the full key (student.num_heads);
    # a teacher is named by its ladder name instead. Not a field (ClassVar), so not in the config.
    KEY_PREFIX: ClassVar[str] = ""

    def __post_init__(self) -> None:
        p = self._problems()
        _raise_if(p, self.KEY_PREFIX.rstrip(".") or f"model '{self.name}'")

    def _problems(self) -> List[str]:
        p: List[str] = []
        k = self.KEY_PREFIX
        # A student cut from another model (StudentConfig.init_from) takes its architecture from there.
        if self.path is None and not getattr(self, "init_from", None):
            for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
                _check(p, getattr(self, key) > 0, f"{k}{key}={getattr(self, key)} must be > 0")
            _check(p, self.num_heads <= 0 or self.hidden_size % self.num_heads == 0,
                   f"{k}hidden_size={self.hidden_size} must be divisible by {k}num_heads={self.num_heads}")
            kv = self.num_kv_heads or self.num_heads
            _check(p, kv > 0 and self.num_heads % kv == 0,
                   f"{k}num_heads={self.num_heads} must be divisible by {k}num_kv_heads={self.num_kv_heads}")
        _check(p, self.gguf_file is None or self.path is not None or getattr(self, "init_from", None),
               f"{k}gguf_file needs {k}path (the repo or folder that holds it)")
        return p


@dataclass
class LoraConfig:
    """LoRA adapters through peft. Off for the tiny from-scratch students (full fine-tuning)."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    merge_on_save: bool = False  # also write checkpoints/merged: the base with the adapter folded in

    def __post_init__(self) -> None:
        p: List[str] = []
        _check(p, self.r >= 1, f"student.lora.r={self.r} must be >= 1")
        _check(p, 0.0 <= self.dropout < 1.0, f"student.lora.dropout={self.dropout} must be in [0, 1)")
        _check(p, len(self.target_modules) > 0, "student.lora.target_modules must name at least one module")
        _raise_if(p, "student.lora")


@dataclass
class StudentConfig(ModelConfig):
    lora: LoraConfig = field(default_factory=LoraConfig)
    # A student cut from another model (DistilBERT's initialisation; Minitron's depth pruning):
    # its embeddings, final norm, head and the blocks ``keep_layers`` (or every ``keep_every``-th
    # block from the first: 0, k, 2k, ...; neither: all of them), in the source's order. The source
    # is a teacher of the ladder, by name (a from-scratch one once it is trained), or a folder, hub
    # id or pkg: path (with ``gguf_file`` naming the GGUF file in it). The student shares the
    # source's tokenizer; ``path`` and the architecture fields are unused.
    init_from: Optional[str] = None
    keep_layers: Optional[List[int]] = None
    keep_every: Optional[int] = None
    KEY_PREFIX: ClassVar[str] = "student."

    def _problems(self) -> List[str]:
        p = super()._problems()
        _check(p, self.init_from is None or self.path is None,
               f"student.path={self.path} and student.init_from={self.init_from}: set one (path loads a model "
               f"as it is; init_from cuts the student from a model)")
        for key in ("keep_layers", "keep_every"):
            _check(p, getattr(self, key) is None or self.init_from is not None,
                   f"student.{key} needs student.init_from (the model whose layers are kept)")
        _check_keep(p, "student.", self.keep_layers, self.keep_every)
        return p


def _check_keep(p: List[str], k: str, keep_layers: Optional[List[int]], keep_every: Optional[int]) -> None:
    """The layers a cut keeps, as far as they can be checked without the source's layer count
    (that range is checked against its config: clpd.preflight)."""
    _check(p, keep_layers is None or keep_every is None,
           f"{k}keep_layers and {k}keep_every: set one (the layers to keep, or every k-th)")
    if keep_layers is not None:
        layers = list(keep_layers)
        repeated = sorted({i for i in layers if layers.count(i) > 1})
        _check(p, len(layers) > 0, f"{k}keep_layers=[] must name at least one layer (null keeps all)")
        _check(p, not repeated, f"{k}keep_layers={layers}: {repeated} repeated; each layer can be kept once")
        _check(p, all(i >= 0 for i in layers),
               f"{k}keep_layers={layers}: layers are numbered from 0 (negative: {[i for i in layers if i < 0]})")
    _check(p, keep_every is None or keep_every >= 1, f"{k}keep_every={keep_every} must be >= 1")


@dataclass
class BenchmarkConfig:
    """Where problems come from. One schema for all benchmarks; fields a benchmark does not use
    are ignored by it (the generator fields only matter for ``arith``)."""

    name: BenchmarkName = BenchmarkName.arith
    # gsm8k: None = the Hugging Face dataset ``hf_path``/``hf_config``; a folder with
    # train.jsonl/test.jsonl in the original format otherwise. svamp: folder with SVAMP.json.
    data_dir: Optional[str] = None
    hf_path: str = "openai/gsm8k"
    hf_config: str = "main"
    train_split: str = "train"
    eval_split: str = "test"
    train_limit: Optional[int] = None  # first N training problems (None: all)
    eval_limit: Optional[int] = None  # first N evaluation problems (None: all)
    chat_template: bool = False  # wrap question/answer in the tokenizer's chat template
    # Solved examples before each evaluation question, as lm-evaluation-harness's gsm8k (5-shot):
    # drawn with random.Random(fewshot_seed).sample from fewshot_split, anew for each question in
    # order; "Question: ...\nAnswer: <solution>" blocks joined by a blank line, or with
    # chat_template=true user/assistant turns (lm-eval's --fewshot_as_multiturn). Evaluation only:
    # training examples are always zero-shot.
    num_fewshot: int = 0
    fewshot_split: str = "train"
    fewshot_seed: int = 1234
    # arith generator
    seed: int = 1234  # generator seed; the problems are a pure function of these fields
    train_size: int = 20000
    test_size: int = 1000
    max_steps: int = 4  # problems have 1..max_steps reasoning steps (the difficulty)
    min_value: int = 2  # range of the numbers that appear in questions
    max_value: int = 12

    def __post_init__(self) -> None:
        p: List[str] = []
        for key in ("train_limit", "eval_limit"):
            v = getattr(self, key)
            _check(p, v is None or v > 0, f"benchmark.{key}={v} must be > 0 (or null for all)")
        _check(p, self.num_fewshot >= 0, f"benchmark.num_fewshot={self.num_fewshot} must be >= 0")
        _check(p, self.num_fewshot == 0 or self.name != BenchmarkName.svamp,
               f"benchmark.num_fewshot={self.num_fewshot}: benchmark=svamp has no solutions to show as examples; "
               f"allowed: 0")
        if self.name == BenchmarkName.arith:
            _check(p, self.max_steps >= 1, f"benchmark.max_steps={self.max_steps} must be >= 1")
            _check(p, 1 <= self.min_value <= self.max_value,
                   f"benchmark.min_value={self.min_value}, max_value={self.max_value}: need 1 <= min_value <= max_value")
            _check(p, self.train_size >= 0 and self.test_size >= 0, "benchmark.train_size and test_size must be >= 0")
        _raise_if(p, "benchmark")


@dataclass
class TeacherBuildConfig:
    """How clpd trains the from-scratch teachers of a ladder that have no weights (``path: null``).

    Each is an ordinary supervised ``clpd train`` run on the benchmark's training split generated
    with ``data_seed``: problems other than the pool the student is distilled on, as a pretrained
    teacher's would be. (Teachers evaluated on their own training pool are almost one-hot, which
    makes distillation the same as supervised training.)
    """

    data_seed: int = 4242
    seed: int = 0  # initial weights; the student's seed is separate, so seeds of a study share teachers
    max_steps: int = 800
    batch_size: int = 32
    grad_accum: int = 4
    lr: float = 5e-3
    warmup_steps: int = 50
    eval: bool = True  # evaluate each new teacher on the test split (cached with it)


@dataclass
class TeachersConfig:
    """The teacher ladder, weakest to strongest. ``none``: supervised fine-tuning, no teacher."""

    name: str = "none"
    ladder: List[ModelConfig] = field(default_factory=list)
    schedule: Schedule = Schedule.strongest
    fixed: Optional[str] = None  # the teacher's name, with schedule=fixed
    # Where stage k+1 begins, as fractions of training (K-1 increasing values in (0, 1)); None:
    # K even stages. The curriculum supplies its own boundaries through the same function.
    boundaries: Optional[List[float]] = None
    cache_dir: str = "outputs/teachers"  # trained from-scratch teachers, keyed by config and data
    build: TeacherBuildConfig = field(default_factory=TeacherBuildConfig)
    # Changes to ``build`` for single teachers, by ladder name, e.g. {medium: {max_steps: 3000}}
    # (on the command line: ++teachers.build_overrides.medium.max_steps=3000): a rung that needs
    # longer than the others to reach the plateau of its learning curve. Only that teacher's cache
    # key changes, so the others are not retrained.
    build_overrides: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    build_only: bool = False  # build (and evaluate) the ladder, then stop: +experiment=arith_teachers

    def __post_init__(self) -> None:
        p: List[str] = []
        names = [t.name for t in self.ladder]
        _check(p, len(set(names)) == len(names), f"teachers.ladder names must be unique, got {names}")
        if self.schedule == Schedule.fixed:
            _check(p, self.fixed in names, f"teachers.fixed={self.fixed} must name a teacher of the ladder: {names}")
        build_fields = [f.name for f in fields(TeacherBuildConfig)]
        for name, changes in self.build_overrides.items():
            if name not in names:  # e.g. a ladder replaced on the command line: its preset's overrides stay behind
                logging.getLogger("clpd.config").warning(
                    "teachers.build_overrides.%s: no teacher of that name in the ladder %s; ignored", name, names)
            for key in changes:
                _check(p, key in build_fields,
                       f"teachers.build_overrides.{name}.{key}: not a build setting; allowed: {', '.join(build_fields)}")
        if self.boundaries is not None:
            b = list(self.boundaries)
            _check(p, len(b) == max(len(names) - 1, 0),
                   f"teachers.boundaries={b} needs {max(len(names) - 1, 0)} values (one fewer than teachers)")
            _check(p, all(0.0 < x < 1.0 for x in b) and all(x < y for x, y in zip(b, b[1:])),
                   f"teachers.boundaries={b} must be increasing fractions in (0, 1)")
        _raise_if(p, "teachers")


@dataclass
class CurriculumConfig:
    """Order and pacing of the training data. ``none``: random order, everything available.

    The examples are scored (``difficulty``), ordered (``order``), and at training progress p the
    first ``pacing(p)`` fraction of the ordered set is the pool each batch is drawn from. The
    stages of the teacher schedule come from the same pacing (see clpd/curriculum/stages.py).
    """

    name: str = "none"
    difficulty: Difficulty = Difficulty.cot_steps
    order: Order = Order.random
    pacing: Pacing = Pacing.none
    start: float = 0.2  # c0: the fraction available at the first step
    saturate: float = 0.8  # the fraction of training at which the whole set is available
    root_p: float = 2.0  # pacing=root: the p of the root-p competence function
    num_buckets: int = 4  # pacing=step: equal buckets added cumulatively
    teacher: Optional[str] = None  # difficulty=teacher_loss: the ladder teacher that scores
    rrf_scorers: List[Difficulty] = field(default_factory=lambda: [Difficulty.cot_steps, Difficulty.cot_length])
    num_stages: Optional[int] = None  # K; None: the number of teachers (1 without teachers)
    stage_boundaries: Optional[List[float]] = None  # without pacing: where stages 2..K begin (fractions)
    score_batch_size: int = 64  # examples per forward pass when a model scores difficulty

    def __post_init__(self) -> None:
        p: List[str] = []
        _check(p, 0.0 < self.start <= 1.0, f"curriculum.start={self.start} must be in (0, 1]")
        _check(p, 0.0 < self.saturate <= 1.0, f"curriculum.saturate={self.saturate} must be in (0, 1]")
        _check(p, self.root_p >= 1, f"curriculum.root_p={self.root_p} must be >= 1")
        _check(p, self.num_buckets >= 2, f"curriculum.num_buckets={self.num_buckets} must be >= 2")
        _check(p, self.num_stages is None or self.num_stages >= 1, f"curriculum.num_stages={self.num_stages} must be >= 1")
        _check(p, Difficulty.rrf not in self.rrf_scorers and len(self.rrf_scorers) >= 1,
               f"curriculum.rrf_scorers={[d.value for d in self.rrf_scorers]} must name at least one scorer other than rrf")
        if self.stage_boundaries is not None:
            b = list(self.stage_boundaries)
            _check(p, all(0.0 < x < 1.0 for x in b) and all(x < y for x, y in zip(b, b[1:])),
                   f"curriculum.stage_boundaries={b} must be increasing fractions in (0, 1)")
        _raise_if(p, "curriculum")


@dataclass
class DistillConfig:
    """The token-level loss. ``sft``: cross-entropy on the gold solution tokens."""

    name: str = "sft"
    loss: DistillLoss = DistillLoss.sft
    temperature: float = 1.0  # softmax temperature of both models; the divergence is scaled by T^2
    alpha: float = 0.0  # loss = alpha * ce + (1 - alpha) * kd (kd losses only)
    beta: float = 0.5  # jsd: the teacher's weight in the mixture
    skew_lambda: float = 0.1  # skew_forward_kl / skew_reverse_kl: DistiLLM's lambda
    # Answer tokens per chunk of the KD loss: bounds its fp32 [chunk, vocab] temporaries. 256 rather
    # than 1024: at 152k rows and 2,048 answer rows per micro-batch the loss then peaks at 0.18x of
    # naive full-vocabulary logits with stored outputs (1024: 0.29x; clpd.bench.store memory).
    # Small losses are one chunk whatever this says (clpd.losses.RECOMPUTE_ABOVE).
    chunk_size: int = 256
    # Where the teacher's logits come from: its forward at every step (live), or a store of its
    # top-k logits at every training example's answer positions, built once into
    # <teachers.cache_dir>/outputs and shared by every run that needs the same one (stored).
    teacher_outputs: TeacherOutputs = TeacherOutputs.live
    # stored: logits kept per answer position (the rest is one tail bucket); null: every compared
    # vocabulary row, which gives exactly the live loss (and a store as large as full logits).
    top_k: Optional[int] = 32
    store_batch_size: int = 64  # examples per teacher forward while a store is built

    def __post_init__(self) -> None:
        p: List[str] = []
        _check(p, self.temperature > 0, f"distill.temperature={self.temperature} must be > 0")
        _check(p, self.top_k is None or self.top_k >= 1,
               f"distill.top_k={self.top_k} must be >= 1 (logits kept per answer position), or null for every row")
        _check(p, self.store_batch_size >= 1, f"distill.store_batch_size={self.store_batch_size} must be >= 1")
        _check(p, 0.0 <= self.alpha <= 1.0, f"distill.alpha={self.alpha} must be in [0, 1]")
        _check(p, 0.0 <= self.beta <= 1.0, f"distill.beta={self.beta} must be in [0, 1]")
        _check(p, 0.0 <= self.skew_lambda < 1.0, f"distill.skew_lambda={self.skew_lambda} must be in [0, 1)")
        _check(p, self.chunk_size >= 1, f"distill.chunk_size={self.chunk_size} must be >= 1")
        _raise_if(p, "distill")


@dataclass
class TrainerConfig:
    max_steps: int = 700  # optimizer steps; with max_tokens, the length of the schedules instead
    # A token budget: train until this many (non-padding) tokens have been read. The LR schedule,
    # the pacing and the teacher stages then advance with the tokens read (schedule step =
    # tokens_seen / max_tokens * max_steps), so every arm runs its whole schedule in the same
    # compute and arms with shorter (easier) examples take more optimizer steps.
    max_tokens: Optional[int] = None
    batch_size: int = 32  # examples per optimizer step (all micro-batches together)
    grad_accum: int = 4  # micro-batches per optimizer step; batch_size must divide evenly
    # Padding-free micro-batches: the examples of a micro-batch in one row, positions restarting at
    # each, attention kept inside each. None: on CUDA where the models keep packed examples apart
    # (checked on the student before the first step); padded on the CPU, where sdpa's mask over a
    # packed row is quadratic in its length (measured 2x slower than sorted padded micro-batches).
    packing: Optional[bool] = None
    # Micro-batches by tokens instead of grad_accum: the step's batch, sorted by length, is cut into
    # micro-batches of at most this many tokens (padding included when not packed), so long and short
    # examples cost what they contain. None: grad_accum micro-batches of equal example counts.
    micro_batch_tokens: Optional[int] = None
    lr: float = 5e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    lr_schedule: LrSchedule = LrSchedule.cosine
    warmup_steps: int = 50
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    max_length: int = 512  # tokens per training example (prompt + answer)
    overlong: Overlong = Overlong.drop  # longer examples: dropped or left-truncated, and counted in the log
    precision: Precision = Precision.auto
    device: Device = Device.auto
    log_every: int = 10
    save: bool = True  # write checkpoints (checkpoints/final at the end, step-N every save_every steps)
    save_every: Optional[int] = None  # also a checkpoint every N optimizer steps (and on SIGINT/SIGTERM)
    keep_last: int = 2  # step checkpoints kept (the oldest are deleted; final is always kept)
    resume: Optional[str] = None  # "auto": the newest complete checkpoint of the run dir; or a checkpoint path
    resume_force: bool = False  # resume even when the config, ladder or data differ from the checkpoint's
    skip_nonfinite: bool = False  # skip a step whose loss is nan/inf (counted) instead of stopping the run
    num_threads: Optional[int] = None  # torch CPU threads (None: torch's default)
    tensorboard: bool = False  # also write TensorBoard event files to <run>/tensorboard (pip install tensorboard)
    eval_at_end: bool = True  # evaluate the final student on benchmark.eval_split (into <run>/eval)
    eval_every: Optional[int] = None  # also evaluate every N steps (a learning curve in metrics.jsonl)
    eval_every_limit: int = 200  # ... on the first N problems of the eval split
    eval_batch_size: int = 128
    eval_max_new_tokens: int = 256

    def __post_init__(self) -> None:
        p: List[str] = []
        for key in ("max_steps", "batch_size", "grad_accum", "log_every", "max_length", "eval_batch_size",
                    "eval_max_new_tokens"):
            _check(p, getattr(self, key) >= 1, f"trainer.{key}={getattr(self, key)} must be >= 1")
        _check(p, self.grad_accum < 1 or self.batch_size % self.grad_accum == 0,
               f"trainer.batch_size={self.batch_size} must be divisible by trainer.grad_accum={self.grad_accum}")
        _check(p, self.lr > 0, f"trainer.lr={self.lr} must be > 0")
        _check(p, 0.0 <= self.min_lr_ratio <= 1.0, f"trainer.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(p, self.warmup_steps >= 0, f"trainer.warmup_steps={self.warmup_steps} must be >= 0")
        _check(p, self.grad_clip >= 0, f"trainer.grad_clip={self.grad_clip} must be >= 0 (0 disables)")
        _check(p, self.save_every is None or self.save_every >= 1, f"trainer.save_every={self.save_every} must be >= 1 (or null)")
        _check(p, self.keep_last >= 1, f"trainer.keep_last={self.keep_last} must be >= 1")
        _check(p, self.resume is None or self.resume == "auto" or Path(self.resume).expanduser().is_dir(),
               f"trainer.resume={self.resume}: expected auto or a checkpoint folder (no such folder)")
        _check(p, self.max_tokens is None or self.max_tokens >= 1, f"trainer.max_tokens={self.max_tokens} must be >= 1 (or null)")
        _check(p, self.micro_batch_tokens is None or self.micro_batch_tokens >= 2,
               f"trainer.micro_batch_tokens={self.micro_batch_tokens} must be >= 2 (or null for grad_accum micro-batches)")
        _check(p, self.eval_every is None or self.eval_every >= 1, f"trainer.eval_every={self.eval_every} must be >= 1 (or null)")
        _check(p, self.eval_every_limit >= 1, f"trainer.eval_every_limit={self.eval_every_limit} must be >= 1")
        _raise_if(p, "trainer")


@dataclass
class TrainConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        p: List[str] = []
        _check(p, self.benchmark.name != BenchmarkName.svamp,
               "benchmark=svamp is for evaluation only (it has no chain-of-thought solutions); train on arith or gsm8k")
        _check(p, self.distill.loss == DistillLoss.sft or len(self.teachers.ladder) > 0,
               f"distill.loss={self.distill.loss.value} needs a teacher ladder (teachers=none has none)")
        if self.distill.teacher_outputs == TeacherOutputs.stored:
            _check(p, self.distill.loss != DistillLoss.sft and self.distill.alpha < 1.0,
                   f"distill.teacher_outputs=stored needs a teacher's loss term: distill.loss={self.distill.loss.value}, "
                   f"alpha={self.distill.alpha} takes none; allowed: a divergence ({', '.join(LOSS_NAMES[1:])}) with "
                   f"alpha < 1, or distill.teacher_outputs=live")
        names = [t.name for t in self.teachers.ladder]
        c = self.curriculum
        uses_teacher = c.difficulty == Difficulty.teacher_loss or (
            c.difficulty == Difficulty.rrf and Difficulty.teacher_loss in c.rrf_scorers)
        if uses_teacher:
            _check(p, c.teacher in names,
                   f"curriculum.teacher={c.teacher} must name a teacher of the ladder for teacher_loss: {names}")
        _check(p, not (c.stage_boundaries is not None and self.teachers.boundaries is not None),
               "set stage boundaries once: curriculum.stage_boundaries or teachers.boundaries, not both")
        s = self.student
        if s.init_from is not None and s.init_from in names:
            _check(p, s.gguf_file is None,
                   f"student.gguf_file={s.gguf_file}: student.init_from={s.init_from} names a teacher of the ladder, "
                   f"whose own path and gguf_file are used; set student.gguf_file=null")
        stages = self.num_stages()
        if c.stage_boundaries is not None:
            _check(p, len(c.stage_boundaries) == stages - 1,
                   f"curriculum.stage_boundaries={list(c.stage_boundaries)} needs {stages - 1} values for {stages} stages")
        _raise_if(p, "train")

    def num_stages(self) -> int:
        """K: curriculum.num_stages, else one stage per teacher (one without teachers)."""
        return self.curriculum.num_stages or max(len(self.teachers.ladder), 1)


@dataclass
class EvalConfig:
    checkpoint: Optional[str] = None  # a clpd checkpoint folder, any save_pretrained folder, a HF id or a pkg: path
    gguf_file: Optional[str] = None
    # Evaluate the checkpoint cut to these blocks (or every k-th), as student.init_from cuts a
    # student: a cut student's accuracy before any training.
    keep_layers: Optional[List[int]] = None
    keep_every: Optional[int] = None
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    batch_size: int = 128  # prompts per generate() call
    max_new_tokens: int = 256  # lm-evaluation-harness's max_gen_toks for gsm8k
    precision: Precision = Precision.auto
    device: Device = Device.auto
    num_threads: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        p: List[str] = []
        _check(p, bool(self.checkpoint), "checkpoint is required: clpd eval checkpoint=PATH_OR_HF_ID")
        _check(p, self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        _check(p, self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1")
        _check_keep(p, "", self.keep_layers, self.keep_every)
        _raise_if(p, "eval")


def register_configs() -> None:
    """Make the top-level schemas available to the defaults lists of train.yaml and eval.yaml.

    The group yamls merge into the typed nodes of these schemas, so they are validated too."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)


def to_object(cfg: DictConfig) -> Any:
    """Turn a composed DictConfig into the schema objects, running every ``__post_init__`` check.

    Model paths written ``pkg:MODULE`` become the folder of that installed package here
    (:mod:`clpd.models.sources`); ``cfg`` itself keeps them as written (checkpoints, manifests)."""
    return resolve_sources(OmegaConf.to_object(cfg))
