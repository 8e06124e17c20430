"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore.

Hydra validates every value against these schemas while it composes the config, so a bad enum
value (``trainer.precision=fp8``) is refused with the allowed values before any job starts, even
inside a sweep. Rules that involve several fields live in ``__post_init__`` and run when a command
turns its DictConfig into these objects with :func:`to_object`, first thing, before any work.
All problems found by one check are reported together, each naming its key (as litgpt does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from clpd.errors import ClpdError


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


class LrSchedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class DistillLoss(str, Enum):
    sft = "sft"  # cross-entropy on the gold solution; the divergences arrive with the teachers


class Pacing(str, Enum):
    none = "none"  # the whole training set is available from the first step


class Order(str, Enum):
    random = "random"


class Difficulty(str, Enum):
    cot_steps = "cot_steps"


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
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        p: List[str] = []
        if self.path is None:
            for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
                _check(p, getattr(self, key) > 0, f"{key}={getattr(self, key)} must be > 0")
            _check(p, self.num_heads <= 0 or self.hidden_size % self.num_heads == 0,
                   f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
            kv = self.num_kv_heads or self.num_heads
            _check(p, kv > 0 and self.num_heads % kv == 0,
                   f"num_heads={self.num_heads} must be divisible by num_kv_heads={self.num_kv_heads}")
        _check(p, self.gguf_file is None or self.path is not None, "gguf_file needs path (the repo or folder that holds it)")
        _raise_if(p, f"model '{self.name}'")


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
        if self.name == BenchmarkName.arith:
            _check(p, self.max_steps >= 1, f"benchmark.max_steps={self.max_steps} must be >= 1")
            _check(p, 1 <= self.min_value <= self.max_value,
                   f"benchmark.min_value={self.min_value}, max_value={self.max_value}: need 1 <= min_value <= max_value")
            _check(p, self.train_size >= 0 and self.test_size >= 0, "benchmark.train_size and test_size must be >= 0")
        _raise_if(p, "benchmark")


@dataclass
class TeachersConfig:
    """The teacher ladder, weakest to strongest. ``none``: supervised fine-tuning, no teacher."""

    name: str = "none"
    ladder: List[ModelConfig] = field(default_factory=list)


@dataclass
class CurriculumConfig:
    """Order and pacing of the training data. ``none``: random order, everything available."""

    name: str = "none"
    difficulty: Difficulty = Difficulty.cot_steps
    order: Order = Order.random
    pacing: Pacing = Pacing.none


@dataclass
class DistillConfig:
    """The token-level loss. ``sft``: cross-entropy on the gold solution tokens."""

    name: str = "sft"
    loss: DistillLoss = DistillLoss.sft
    temperature: float = 1.0
    alpha: float = 0.0  # loss = alpha * ce + (1 - alpha) * kd (kd losses only)

    def __post_init__(self) -> None:
        p: List[str] = []
        _check(p, self.temperature > 0, f"distill.temperature={self.temperature} must be > 0")
        _check(p, 0.0 <= self.alpha <= 1.0, f"distill.alpha={self.alpha} must be in [0, 1]")
        _raise_if(p, "distill")


@dataclass
class TrainerConfig:
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 32  # examples per optimizer step (all micro-batches together)
    grad_accum: int = 4  # micro-batches per optimizer step; batch_size must divide evenly
    lr: float = 5e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    lr_schedule: LrSchedule = LrSchedule.cosine
    warmup_steps: int = 50
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    max_seq_len: int = 512  # longer examples are truncated (and counted in the log)
    precision: Precision = Precision.auto
    device: Device = Device.auto
    log_every: int = 10
    save: bool = True  # write checkpoints/final
    num_threads: Optional[int] = None  # torch CPU threads (None: torch's default)

    def __post_init__(self) -> None:
        p: List[str] = []
        for key in ("max_steps", "batch_size", "grad_accum", "log_every", "max_seq_len"):
            _check(p, getattr(self, key) >= 1, f"trainer.{key}={getattr(self, key)} must be >= 1")
        _check(p, self.grad_accum < 1 or self.batch_size % self.grad_accum == 0,
               f"trainer.batch_size={self.batch_size} must be divisible by trainer.grad_accum={self.grad_accum}")
        _check(p, self.lr > 0, f"trainer.lr={self.lr} must be > 0")
        _check(p, 0.0 <= self.min_lr_ratio <= 1.0, f"trainer.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(p, self.warmup_steps >= 0, f"trainer.warmup_steps={self.warmup_steps} must be >= 0")
        _check(p, self.grad_clip >= 0, f"trainer.grad_clip={self.grad_clip} must be >= 0 (0 disables)")
        _raise_if(p, "trainer")


@dataclass
class TrainConfig:
    student: ModelConfig = field(default_factory=ModelConfig)
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
        _raise_if(p, "train")


@dataclass
class EvalConfig:
    checkpoint: Optional[str] = None  # a clpd checkpoint folder, any save_pretrained folder, or a HF id
    gguf_file: Optional[str] = None
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
        _raise_if(p, "eval")


def register_configs() -> None:
    """Make the top-level schemas available to the defaults lists of train.yaml and eval.yaml.

    The group yamls merge into the typed nodes of these schemas, so they are validated too."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)


def to_object(cfg: DictConfig) -> Any:
    """Turn a composed DictConfig into the schema objects, running every ``__post_init__`` check."""
    return OmegaConf.to_object(cfg)
