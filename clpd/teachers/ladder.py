"""Building the teacher ladder: cache keys and folders of the from-scratch teachers, training the
missing ones, their accuracy, the order check and the ladder table.

A pretrained teacher (``path`` set) is used as it is. A from-scratch teacher without weights is
trained once, by an ordinary supervised run, into ``teachers.cache_dir/<name>-<key>``, where the
key covers its architecture, the data it learns from and how it is trained, and reused after.
Only the rungs a run uses are built (:func:`teachers_in_use`: the schedule's and the difficulty
scorer's), each under the cache entry's file lock (:mod:`clpd.cache`), so runs started at once on
an empty cache train each teacher once: one builds it, the others wait for it.
The command hands in the functions that train and evaluate (``clpd train`` passes its own
``run_train`` and :func:`clpd.evaluation.evaluate.evaluate_checkpoint`), so this module imports no command.

The schedule (which teacher supervises which step) and residency (only the active teacher on the
device) are :mod:`clpd.teachers.live`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from clpd.cache import build_lock, build_once
from clpd.config.enums import BenchmarkName, Difficulty, DistillLoss, Targets
from clpd.config.model import ModelConfig, StudentConfig
from clpd.config.schema import BenchmarkConfig, TeacherBuildConfig, TrainConfig
from clpd.curriculum.scorers import TEACHER_SCORERS, is_curriculum, scorers
from clpd.errors import ClpdError
from clpd.files import digest, plain_json
from clpd.models.load import architecture_config, pretrained_source
from clpd.teachers.schedule import teacher_index

log = logging.getLogger("clpd.teachers.ladder")

TrainFn = Callable[[DictConfig, Path, Console], dict]  # (config, run dir, console) -> summary: clpd.commands.run_train.run_train
EvalFn = Callable[..., dict]  # clpd.evaluation.evaluate.evaluate_checkpoint


@dataclass
class Ladder:
    """The ladder ready to load: ``specs`` is every rung, in ladder order (the schedule's indices),
    with the built from-scratch teachers pointing at their checkpoints; ``used`` the indices of the
    rungs this run loads (only those were built); ``rows`` (name, parameters, path, accuracy, used)
    go into ``teachers.json`` and the ladder table."""
    specs: List[ModelConfig]
    rows: List[dict]
    used: List[int] = dataclasses.field(default_factory=list)

    def in_use(self) -> List[ModelConfig]:
        """The rungs this run loads (what a checkpoint's manifest records)."""
        return [self.specs[i] for i in self.used]


# --- keys and folders ----------------------------------------------------------------------------

def build_config(spec: ModelConfig, tc: TrainConfig) -> TeacherBuildConfig:
    """How ``spec`` is trained: ``teachers.build`` with its ``teachers.build_overrides`` entry."""
    return replace(tc.teachers.build, **tc.teachers.build_overrides.get(spec.name, {}))


# Which settings make a from-scratch teacher, field by field. The key of its cache folder holds
# exactly those that change its weights; the settings that only change how it is scored key its
# evaluation folder instead, so a change of them re-evaluates the cached teacher, not retrains it.
# Every field of BenchmarkConfig and TrainerConfig is in one tuple (tests/test_teacher_key.py).

# The data the teacher learns from: its training split, where it is read from, how it is generated
# (arith) and how each example is written.
BENCHMARK_TRAINING_FIELDS = (
    "name", "train_split", "train_limit", "train_size", "max_steps", "min_value", "max_value",
    "data_dir", "hf_path", "hf_config",  # where gsm8k's training split is read from
    "path", "train_path", "fields",  # a file benchmark's training file and how its fields are read
    "chat_template",  # the prompt format of the training examples
)
BENCHMARK_EVAL_ONLY_FIELDS = (
    "eval_split", "eval_limit", "eval_path",
    "task",  # a file benchmark's name in results
    "test_size",  # arith's splits are disjoint by question: the training split does not depend on it
    "num_fewshot", "fewshot_split", "fewshot_seed",  # training examples are always zero-shot
    "seed",  # the teacher's problems are drawn with teachers.build.data_seed (in the key); this draws the test split
)

# The trainer settings the teacher's run inherits (teacher_train_config) and that change its weights.
TRAINER_TRAINING_FIELDS = (
    "lr_schedule", "min_lr_ratio", "weight_decay", "adam_beta1", "adam_beta2", "grad_clip",
    "max_length", "overlong",  # which examples it trains on, and how much of their prompts
    "packing", "micro_batch_tokens",  # the layout of micro-batches: same update in exact arithmetic, other rounding
    "precision", "device",  # autocast dtype; the device also decides precision=auto and packing=null
    "skip_nonfinite",  # a teacher built with skipped steps is one a run without them never yields
)
# Set by teacher_train_config itself (from teachers.build, in the key, or to a fixed value), so the
# teacher's run never reads them from trainer.
TRAINER_SET_FOR_TEACHER_FIELDS = (
    "max_steps", "max_tokens", "batch_size", "grad_accum", "lr", "warmup_steps",
    "save", "save_every", "resume", "resume_force", "eval_at_end", "eval_every",
    "fused_loss",  # always null: where the fused output layer is measured not slower, by the teacher's rows
)
# Inherited, but not the training: what the run logs, keeps, evaluates and how many threads it uses.
TRAINER_UNKEYED_FIELDS = (
    "log_every", "keep_last", "tensorboard", "eval_every_limit", "eval_batch_size", "eval_max_new_tokens",
    "eval_calculator",  # the student's evaluations only: a teacher is scored without the calculator
    # The thread count changes only the order of floating-point sums, as another machine does (and
    # null, torch's default, is the machine's count); a resumed run may change it too (RESUME_FREE_KEYS).
    "num_threads",
)

# What a teacher is scored with besides its weights and the key's settings: the benchmark's
# evaluation-only fields, and the trainer's generation length (the student's too). The batch size of
# generation changes how fast, not what is scored.
TRAINER_SCORING_FIELDS = ("eval_max_new_tokens",)

# A build setting that does not train: whether the new teacher is evaluated.
BUILD_EVAL_ONLY_FIELDS = ("eval",)


# Read by a file benchmark (benchmark=jsonl) alone: left out of the other benchmarks' keys, which
# therefore did not change when these settings were added.
FILE_BENCHMARK_FIELDS = ("path", "train_path", "fields", "eval_path", "task")


def _pick(config: object, names: Sequence[str]) -> dict:
    plain = plain_json(config)
    if isinstance(config, BenchmarkConfig) and config.name != BenchmarkName.jsonl:
        names = [n for n in names if n not in FILE_BENCHMARK_FIELDS]
    return {name: plain[name] for name in names}


def teacher_key(spec: ModelConfig, tc: TrainConfig) -> str:
    """Cache key of a from-scratch teacher: its architecture (not its name: renaming a teacher does
    not retrain it), its build settings, and the benchmark and trainer settings its training run
    takes over that change its weights; none that only change its evaluation."""
    build = build_config(spec, tc)
    payload = {"teacher": {k: v for k, v in plain_json(spec).items() if k != "name"},
               "data": _pick(tc.benchmark, BENCHMARK_TRAINING_FIELDS),
               "trainer": _pick(tc.trainer, TRAINER_TRAINING_FIELDS),
               "build": {k: v for k, v in plain_json(build).items() if k not in BUILD_EVAL_ONLY_FIELDS}}
    return digest(payload)


def teacher_dir(spec: ModelConfig, tc: TrainConfig) -> Path:
    return Path(tc.teachers.cache_dir) / f"{spec.name}-{teacher_key(spec, tc)}"


def _eval_dir(spec: ModelConfig, tc: TrainConfig) -> Path:
    """Where a teacher's test metrics are cached: inside its folder (the key's settings), keyed by the
    evaluation settings, so that two evaluations that can score differently never share metrics."""
    b = tc.benchmark
    settings = {"benchmark": _pick(b, BENCHMARK_EVAL_ONLY_FIELDS), "trainer": _pick(tc.trainer, TRAINER_SCORING_FIELDS)}
    return teacher_dir(spec, tc) / f"eval-{b.label()}-seed{b.seed}-{digest(settings, 8)}"


def teacher_accuracy(spec: ModelConfig, tc: TrainConfig) -> Optional[dict]:
    """The cached test metrics of a built from-scratch teacher on the student's test split."""
    path = _eval_dir(spec, tc) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


# --- building ------------------------------------------------------------------------------------

def teacher_train_config(spec: ModelConfig, tc: TrainConfig) -> DictConfig:
    """The supervised run that trains ``spec``: its architecture as the student, the benchmark's
    training split drawn with ``build.data_seed``, the build's steps, batch and learning rate."""
    build = build_config(spec, tc)
    student = StudentConfig(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(ModelConfig)})
    trainer = replace(tc.trainer, max_steps=build.max_steps, batch_size=build.batch_size, grad_accum=build.grad_accum,
                      lr=build.lr, warmup_steps=build.warmup_steps, save=True, max_tokens=None,
                      eval_every=None, save_every=None, resume=None, resume_force=False,
                      eval_at_end=False,  # build_teacher evaluates on the student's test split instead
                      # How the student's loss meets its output layer is the student run's choice: a
                      # teacher trains as the default does, so setting it never retrains the ladder.
                      fused_loss=None)
    return OmegaConf.structured(TrainConfig(student=student, benchmark=replace(tc.benchmark, seed=build.data_seed),
                                            trainer=trainer, seed=build.seed))


def _has_final(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "final").is_dir()


def build_teacher(spec: ModelConfig, tc: TrainConfig, console: Console, *, train: TrainFn,
                  evaluate: EvalFn) -> ModelConfig:
    """The spec of a loadable teacher: ``spec`` itself when it has weights, else the cached (and,
    the first time, freshly trained) checkpoint of its from-scratch architecture.

    The training run writes into a temporary folder that becomes the cache entry when it is done,
    under the entry's lock: a second run that needs the same teacher meanwhile waits for it and
    then reuses it, and a build killed half-way leaves nothing that looks like a teacher."""
    if spec.path is not None:
        return spec
    run_dir = teacher_dir(spec, tc)
    final = run_dir / "checkpoints" / "final"

    def train_into(tmp: Path) -> None:
        console.print(f"[bold]training teacher {spec.name}[/] (from scratch, not in the cache yet) into {run_dir}",
                      soft_wrap=True)
        train(teacher_train_config(spec, tc), tmp, console)

    if not build_once(run_dir, train_into, what=f"teacher {spec.name}", complete=_has_final):
        log.info("teacher %s: reusing %s", spec.name, final)
    if tc.teachers.build.eval and teacher_accuracy(spec, tc) is None:
        with build_lock(run_dir, what=f"teacher {spec.name}'s evaluation"):
            if teacher_accuracy(spec, tc) is None:  # not evaluated by the run this one waited for
                # On the student's test split, so that teachers and students are scored on the same problems.
                # With the student's generation settings, so that both are scored the same way.
                evaluate(str(final), tc.benchmark, _eval_dir(spec, tc), console, device=tc.trainer.device,
                         precision=tc.trainer.precision, batch_size=tc.trainer.eval_batch_size,
                         max_new_tokens=tc.trainer.eval_max_new_tokens)
    return replace(spec, path=str(final))


def count_spec_parameters(spec: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> Optional[int]:
    """Parameters of a teacher without loading its weights (a meta-device model); None if its
    config cannot be read (e.g. a hub id offline)."""
    try:
        if spec.path is None:
            config = architecture_config(spec, tokenizer)
        else:
            path, gguf_file = pretrained_source(spec, f"teacher '{spec.name}'")
            config = AutoConfig.from_pretrained(path, gguf_file=gguf_file)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in model.parameters())
    except (OSError, ValueError, ClpdError):
        return None


def check_ladder_order(ladder: Sequence[ModelConfig], tokenizer: PreTrainedTokenizerBase) -> List[Optional[int]]:
    """The parameter count of each rung; warns when they do not increase (weakest first)."""
    sizes = [count_spec_parameters(spec, tokenizer) for spec in ladder]
    known = [(s, spec.name) for s, spec in zip(sizes, ladder) if s is not None]
    if any(a[0] >= b[0] for a, b in zip(known, known[1:])):
        log.warning("the teacher ladder is not increasing in parameter count: %s",
                    ", ".join(f"{name} {s / 1e6:.2f}M" for s, name in known))
    return sizes


def ladder_row(spec: ModelConfig, parameters: Optional[int], accuracy: Optional[dict], used: bool = True) -> dict:
    return {"name": spec.name, "parameters": parameters, "path": spec.path if used else None,
            "accuracy_strict": accuracy and accuracy["accuracy_strict"],
            "by_difficulty": accuracy and accuracy["by_difficulty"], "used": used}


def ladder_needed(tc: TrainConfig) -> bool:
    """Whether a run builds and loads its ladder: to distil from it, to score difficulty by a
    teacher's loss, or to build it alone (``teachers.build_only``)."""
    return bool(tc.teachers.ladder) and (tc.teachers.build_only or tc.distill.loss != DistillLoss.sft
                                         or tc.distill.targets == Targets.teacher
                                         or bool(TEACHER_SCORERS & set(scorers(tc.curriculum))))


def distilling_teachers(tc: TrainConfig) -> List[int]:
    """The rungs the teacher schedule picks over the run (indices into ``teachers.ladder``):
    standard KD the strongest alone, ``fixed`` that one, ``progressive`` one per stage (with fewer
    stages than rungs the last ones are never used); none for SFT on gold solutions. With
    ``distill.targets=teacher`` these rungs also write the solutions the student trains on."""
    ladder = tc.teachers.ladder
    if (tc.distill.loss == DistillLoss.sft and tc.distill.targets != Targets.teacher) or not ladder:
        return []
    # One step in each stage, through the schedule the loop uses: stage k is step k here.
    stages = tc.num_stages()
    names = [t.name for t in ladder]
    fixed = names.index(tc.teachers.fixed) if tc.teachers.fixed in names else 0
    return sorted({teacher_index(k, schedule=tc.teachers.schedule, num_teachers=len(ladder), starts=list(range(1, stages)),
                                 fixed_index=fixed) for k in range(stages)})


def teachers_in_use(tc: TrainConfig) -> List[int]:
    """The rungs a run loads, as indices into ``teachers.ladder``: the ones its teacher schedule
    picks (standard KD: the strongest alone; ``fixed``: that one; ``progressive``: one per stage,
    so with fewer stages than rungs the last ones are never used), the one that scores difficulty
    (``curriculum.difficulty=teacher_loss``, when the scores order or pace the data), and every
    rung with ``teachers.build_only``. Only these are built."""
    if not ladder_needed(tc):
        return []
    ladder = tc.teachers.ladder
    if tc.teachers.build_only:
        return list(range(len(ladder)))
    names = [t.name for t in ladder]
    used = set(distilling_teachers(tc))
    if TEACHER_SCORERS & set(scorers(tc.curriculum)) and is_curriculum(tc.curriculum):
        used.add(names.index(tc.curriculum.teacher))  # clpd.commands.run_train scores only when the order depends on it
    return sorted(used)


def build_ladder(tc: TrainConfig, tokenizer: PreTrainedTokenizerBase, console: Console, *, train: TrainFn,
                 evaluate: EvalFn) -> Ladder:
    """The rungs of ``teachers.ladder`` that this run uses made loadable (from-scratch ones trained
    if missing), with every rung's size and, for from-scratch teachers in the cache, their accuracy
    on the student's test split. A rung the run does not use keeps its spec and is not built."""
    ladder = tc.teachers.ladder
    used = teachers_in_use(tc)
    sizes = check_ladder_order(ladder, tokenizer)
    specs = [build_teacher(t, tc, console, train=train, evaluate=evaluate) if i in used else t
             for i, t in enumerate(ladder)]
    rows = [ladder_row(built, size, teacher_accuracy(t, tc) if t.path is None else None, used=i in used)
            for i, (t, built, size) in enumerate(zip(ladder, specs, sizes))]
    return Ladder(specs, rows, used)


def ladder_table(rows: Sequence[dict], title: str = "teachers") -> Table:
    """The ladder (and, after training, the student) as a table: size, accuracy, by steps."""
    table = Table(title=title)
    for column in ("model", "parameters", "strict acc", "by steps"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for r in rows:
        by = r["by_difficulty"] or {}
        name = r["name"] if r.get("used", True) else f"{r['name']} (not used)"
        table.add_row(name, f"{r['parameters'] / 1e6:.2f}M" if r["parameters"] else "?",
                      f"{r['accuracy_strict']:.3f}" if r["accuracy_strict"] is not None else "-",
                      " ".join(f"{k}:{v['accuracy_strict']:.2f}" for k, v in by.items()))
    return table
