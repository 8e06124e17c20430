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
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from clpd.errors import Problems
from clpd.config.enums import (BenchmarkName, Device, Difficulty, DistillLoss, Keep, LrSchedule, Order, Overlong,
                               Pacing, Precision, Schedule, StagePlacement, Targets, TeacherOutputs)
from clpd.config.benchmark import BenchmarkConfig, FieldsConfig  # noqa: F401 (the schema of every section, in one place)
from clpd.config.model import ModelConfig, StudentConfig, _check_keep
from clpd.config.package_paths import resolve_sources


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
        p = Problems()
        names = [t.name for t in self.ladder]
        p.check(len(set(names)) == len(names), f"teachers.ladder names must be unique, got {names}")
        if self.schedule == Schedule.fixed:
            p.check(self.fixed in names, f"teachers.fixed={self.fixed} must name a teacher of the ladder: {names}")
        build_fields = [f.name for f in fields(TeacherBuildConfig)]
        for name, changes in self.build_overrides.items():
            if name not in names:  # e.g. a ladder replaced on the command line: its preset's overrides stay behind
                logging.getLogger("clpd.config").warning(
                    "teachers.build_overrides.%s: no teacher of that name in the ladder %s; ignored", name, names)
            for key in changes:
                p.check(key in build_fields,
                        f"teachers.build_overrides.{name}.{key}: not a build setting; allowed: {', '.join(build_fields)}")
        if self.boundaries is not None:
            b = list(self.boundaries)
            p.check(len(b) == max(len(names) - 1, 0),
                    f"teachers.boundaries={b} needs {max(len(names) - 1, 0)} values (one fewer than teachers)")
            p.check(all(0.0 < x < 1.0 for x in b) and all(x < y for x, y in zip(b, b[1:])),
                    f"teachers.boundaries={b} must be increasing fractions in (0, 1)")
        p.raise_if_any("invalid teachers config: ")


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
    teacher: Optional[str] = None  # difficulty=teacher_loss or teacher_cot_steps: the ladder teacher that scores
    rrf_scorers: List[Difficulty] = field(default_factory=lambda: [Difficulty.cot_steps, Difficulty.cot_length])
    num_stages: Optional[int] = None  # K; None: the number of teachers (1 without teachers)
    # With pacing, where stage k begins: pool (the pool reaches k/K of the data), steps (k/K of the
    # steps, or stage_boundaries), band (the pool first holds the k-th band of difficulty levels).
    # Without pacing the stages split the steps evenly (or at the boundaries) whatever this says.
    stage_placement: StagePlacement = StagePlacement.pool
    stage_boundaries: Optional[List[float]] = None  # without pacing: where stages 2..K begin (fractions)
    score_batch_size: int = 64  # examples per forward pass when a model scores difficulty

    def __post_init__(self) -> None:
        p = Problems()
        p.check(0.0 < self.start <= 1.0, f"curriculum.start={self.start} must be in (0, 1]")
        p.check(0.0 < self.saturate <= 1.0, f"curriculum.saturate={self.saturate} must be in (0, 1]")
        p.check(self.root_p >= 1, f"curriculum.root_p={self.root_p} must be >= 1")
        p.check(self.num_buckets >= 2, f"curriculum.num_buckets={self.num_buckets} must be >= 2")
        p.check(self.num_stages is None or self.num_stages >= 1, f"curriculum.num_stages={self.num_stages} must be >= 1")
        p.check(Difficulty.rrf not in self.rrf_scorers and len(self.rrf_scorers) >= 1,
                f"curriculum.rrf_scorers={[d.value for d in self.rrf_scorers]} must name at least one scorer other than rrf")
        if self.stage_boundaries is not None:
            b = list(self.stage_boundaries)
            p.check(all(0.0 < x < 1.0 for x in b) and all(x < y for x, y in zip(b, b[1:])),
                    f"curriculum.stage_boundaries={b} must be increasing fractions in (0, 1)")
        p.raise_if_any("invalid curriculum config: ")


@dataclass
class SamplingConfig:
    """How a model samples answers to the training prompts: the student for on-policy distillation
    (``distill.generation``), the teachers for sequence-level KD (``distill.teacher_generation``)."""

    max_new_tokens: int = 128  # a sample ends at eos or here (then it is kept to this length and counted as unfinished)
    temperature: float = 1.0  # sampling temperature (GKD and TRL sample at 1.0); 0: greedy
    top_p: float = 1.0  # nucleus sampling; 1.0 keeps the whole distribution

    def problems(self, p: Problems, key: str = "distill.generation") -> None:
        p.check(self.max_new_tokens >= 1, f"{key}.max_new_tokens={self.max_new_tokens} must be >= 1")
        p.check(self.temperature >= 0, f"{key}.temperature={self.temperature} must be >= 0 (0: greedy)")
        p.check(0.0 < self.top_p <= 1.0, f"{key}.top_p={self.top_p} must be in (0, 1]")


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
    # naive full-vocabulary logits with stored outputs (1024: 0.29x; python -m clpd.bench.store memory).
    # Small losses are one chunk whatever this says (clpd.losses.RECOMPUTE_ABOVE).
    chunk_size: int = 256
    # With the fused output layer (trainer.fused_loss): each chunk of answer rows is also cut into
    # slices of this many vocabulary rows, so that no [chunk, V] matrix is held, only [chunk, N]
    # ones, for three passes over the output matrix instead of one (clpd.losses.vocab_slices; not
    # against stored top-k outputs). null: whole rows.
    vocab_slice_size: Optional[int] = None
    # Where the teacher's logits come from: its forward at every step (live), or a store of its
    # top-k logits at every training example's answer positions (the gold solutions, or with
    # targets=teacher each teacher's own kept ones), built once into <teachers.cache_dir>/outputs
    # and shared by every run that needs the same one (stored).
    teacher_outputs: TeacherOutputs = TeacherOutputs.live
    # stored: logits kept per answer position (the rest is one tail bucket); null: every compared
    # vocabulary row, which gives exactly the live loss (and a store as large as full logits).
    top_k: Optional[int] = 32
    store_batch_size: int = 64  # examples per teacher forward while a store is built
    # On-policy distillation (GKD's lambda): this share of each step's examples is answered by the
    # student's own samples, which the active teacher scores token by token (the divergence only;
    # cross-entropy stays on the gold examples). 0: off-policy, on the gold solutions only.
    on_policy: float = 0.0
    generation: SamplingConfig = field(default_factory=SamplingConfig)
    # Sequence-level KD: what the student is trained on. gold: the benchmark's solutions; teacher:
    # solutions each teacher of the schedule wrote once to the training prompts (teacher_samples
    # per prompt, stored like the teacher outputs), all of them or only those with the gold answer.
    targets: Targets = Targets.gold
    teacher_samples: int = 1
    keep: Keep = Keep.all
    teacher_generation: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=256, temperature=0.0))

    def __post_init__(self) -> None:
        p = Problems()
        p.check(0.0 <= self.on_policy <= 1.0, f"distill.on_policy={self.on_policy} must be in [0, 1]")
        self.generation.problems(p)
        self.teacher_generation.problems(p, "distill.teacher_generation")
        p.check(self.teacher_samples >= 1, f"distill.teacher_samples={self.teacher_samples} must be >= 1")
        p.check(self.teacher_samples == 1 or self.teacher_generation.temperature > 0,
                f"distill.teacher_samples={self.teacher_samples} with greedy decoding "
                f"(distill.teacher_generation.temperature=0) writes the same solution each time; allowed: "
                f"teacher_samples=1, or a temperature > 0")
        p.check(self.temperature > 0, f"distill.temperature={self.temperature} must be > 0")
        p.check(self.top_k is None or self.top_k >= 1,
                f"distill.top_k={self.top_k} must be >= 1 (logits kept per answer position), or null for every row")
        p.check(self.store_batch_size >= 1, f"distill.store_batch_size={self.store_batch_size} must be >= 1")
        p.check(0.0 <= self.alpha <= 1.0, f"distill.alpha={self.alpha} must be in [0, 1]")
        p.check(0.0 <= self.beta <= 1.0, f"distill.beta={self.beta} must be in [0, 1]")
        p.check(0.0 <= self.skew_lambda < 1.0, f"distill.skew_lambda={self.skew_lambda} must be in [0, 1)")
        p.check(self.chunk_size >= 1, f"distill.chunk_size={self.chunk_size} must be >= 1")
        p.check(self.vocab_slice_size is None or self.vocab_slice_size >= 1,
                f"distill.vocab_slice_size={self.vocab_slice_size} must be >= 1 (or null for whole rows)")
        p.raise_if_any("invalid distill config: ")


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
    # The output layer fused with the loss (clpd.losses.fused): no [answer positions, V] logits or
    # gradient is held, the student's and a live teacher's. None: on where the model allows it and
    # its output layer has a real vocabulary (>= 4,096 rows: clpd.training.head.FUSED_MIN_ROWS).
    fused_loss: Optional[bool] = None
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
    eval_calculator: bool = False  # the final and learning-curve evaluations with the calculator (as eval's calculator)

    def __post_init__(self) -> None:
        p = Problems()
        for key in ("max_steps", "batch_size", "grad_accum", "log_every", "max_length", "eval_batch_size",
                    "eval_max_new_tokens"):
            p.check(getattr(self, key) >= 1, f"trainer.{key}={getattr(self, key)} must be >= 1")
        p.check(self.grad_accum < 1 or self.batch_size % self.grad_accum == 0,
                f"trainer.batch_size={self.batch_size} must be divisible by trainer.grad_accum={self.grad_accum}")
        p.check(self.lr > 0, f"trainer.lr={self.lr} must be > 0")
        p.check(0.0 <= self.min_lr_ratio <= 1.0, f"trainer.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        p.check(self.warmup_steps >= 0, f"trainer.warmup_steps={self.warmup_steps} must be >= 0")
        p.check(self.grad_clip >= 0, f"trainer.grad_clip={self.grad_clip} must be >= 0 (0 disables)")
        p.check(self.save_every is None or self.save_every >= 1, f"trainer.save_every={self.save_every} must be >= 1 (or null)")
        p.check(self.keep_last >= 1, f"trainer.keep_last={self.keep_last} must be >= 1")
        p.check(self.resume is None or self.resume == "auto" or Path(self.resume).expanduser().is_dir(),
                f"trainer.resume={self.resume}: expected auto or a checkpoint folder (no such folder)")
        p.check(self.max_tokens is None or self.max_tokens >= 1, f"trainer.max_tokens={self.max_tokens} must be >= 1 (or null)")
        p.check(self.micro_batch_tokens is None or self.micro_batch_tokens >= 2,
                f"trainer.micro_batch_tokens={self.micro_batch_tokens} must be >= 2 (or null for grad_accum micro-batches)")
        p.check(self.eval_every is None or self.eval_every >= 1, f"trainer.eval_every={self.eval_every} must be >= 1 (or null)")
        p.check(self.eval_every_limit >= 1, f"trainer.eval_every_limit={self.eval_every_limit} must be >= 1")
        p.raise_if_any("invalid trainer config: ")


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
        p = Problems()
        p.check(self.benchmark.name != BenchmarkName.svamp,
                "benchmark=svamp is for evaluation only (it has no chain-of-thought solutions); train on arith or gsm8k")
        p.check(self.benchmark.name != BenchmarkName.jsonl or self.benchmark.fields.solution is not None,
                "benchmark.fields.solution=null: training needs a worked solution per problem; allowed: the name of "
                "the field that holds it (without one, the file benchmark is for clpd eval only)")
        p.check(self.distill.loss == DistillLoss.sft or len(self.teachers.ladder) > 0,
                f"distill.loss={self.distill.loss.value} needs a teacher ladder (teachers=none has none)")
        if self.distill.teacher_outputs == TeacherOutputs.stored:
            p.check(self.distill.loss != DistillLoss.sft and self.distill.alpha < 1.0,
                    f"distill.teacher_outputs=stored needs a teacher's loss term: distill.loss={self.distill.loss.value}, "
                    f"alpha={self.distill.alpha} takes none; allowed: a divergence ({', '.join(loss.value for loss in DistillLoss if loss != DistillLoss.sft)}) with "
                    f"alpha < 1, or distill.teacher_outputs=live")
        d = self.distill
        if d.on_policy > 0:
            p.check(d.loss != DistillLoss.sft and d.alpha < 1.0,
                    f"distill.on_policy={d.on_policy} trains on the student's samples through a teacher's loss term: "
                    f"distill.loss={d.loss.value}, alpha={d.alpha} takes none; allowed: a divergence with alpha < 1, "
                    f"or distill.on_policy=0")
            p.check(d.teacher_outputs == TeacherOutputs.live,
                    f"distill.on_policy={d.on_policy} needs distill.teacher_outputs=live: stored teacher outputs cover "
                    f"the gold or teacher-written solutions only, and the teacher must score the student's own samples")
        if d.targets == Targets.teacher:
            p.check(len(self.teachers.ladder) > 0, "distill.targets=teacher needs a teacher ladder (teachers=none has none)")
        names = [t.name for t in self.teachers.ladder]
        c = self.curriculum
        teacher_scorers = {Difficulty.teacher_loss, Difficulty.teacher_cot_steps}
        uses_teacher = c.difficulty in teacher_scorers or (
            c.difficulty == Difficulty.rrf and teacher_scorers & set(c.rrf_scorers))
        if uses_teacher:
            p.check(c.teacher in names,
                    f"curriculum.teacher={c.teacher} must name a teacher of the ladder for {c.difficulty.value}: {names}")
        p.check(not (c.stage_boundaries is not None and self.teachers.boundaries is not None),
                "set stage boundaries once: curriculum.stage_boundaries or teachers.boundaries, not both")
        p.check(not (c.stage_placement == StagePlacement.band and c.pacing != Pacing.none and c.order == Order.random),
                "curriculum.stage_placement=band needs a difficulty order (curriculum.order=easy_to_hard or "
                "hard_to_easy): a random order has no bands; allowed with order=random: pool, steps")
        s = self.student
        if s.init_from is not None and s.init_from in names:
            p.check(s.gguf_file is None,
                    f"student.gguf_file={s.gguf_file}: student.init_from={s.init_from} names a teacher of the ladder, "
                    f"whose own path and gguf_file are used; set student.gguf_file=null")
        stages = self.num_stages()
        if c.stage_boundaries is not None:
            p.check(len(c.stage_boundaries) == stages - 1,
                    f"curriculum.stage_boundaries={list(c.stage_boundaries)} needs {stages - 1} values for {stages} stages")
        p.raise_if_any("invalid train config: ")

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
    # The calculator writes the result of each <<EXPR= the model opens (clpd.evaluation.calculator);
    # off: the model's own arithmetic, as lm-evaluation-harness scores it.
    calculator: bool = False
    precision: Precision = Precision.auto
    device: Device = Device.auto
    num_threads: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        p = Problems()
        p.check(bool(self.checkpoint), "checkpoint is required: clpd eval checkpoint=PATH_OR_HF_ID")
        p.check(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        p.check(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1")
        _check_keep(p, "", self.keep_layers, self.keep_every)
        p.raise_if_any("invalid eval config: ")


def register_configs() -> None:
    """Make the top-level schemas available to the defaults lists of train.yaml and eval.yaml.

    The group yamls merge into the typed nodes of these schemas, so they are validated too."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)


def to_object(cfg: DictConfig) -> Any:
    """Turn a composed DictConfig into the schema objects, running every ``__post_init__`` check.

    Model paths written ``pkg:MODULE`` become the folder of that installed package here
    (:mod:`clpd.config.package_paths`); ``cfg`` itself keeps them as written (checkpoints, manifests)."""
    return resolve_sources(OmegaConf.to_object(cfg))
