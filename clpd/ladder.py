"""Building the teacher ladder: cache keys and folders of the from-scratch teachers, training the
missing ones, their accuracy, the order check and the ladder table.

A pretrained teacher (``path`` set) is used as it is. A from-scratch teacher without weights is
trained once, by an ordinary supervised run, into ``teachers.cache_dir/<name>-<key>``, where the
key covers its architecture, the data it learns from and how it is trained, and reused after.
The command hands in the functions that train and evaluate (``clpd train`` passes its own
``run_train`` and :func:`clpd.evaluate.evaluate_checkpoint`), so this module imports no command.

The schedule (which teacher supervises which step) and residency (only the active teacher on the
device) are :mod:`clpd.teachers`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from clpd.config import Difficulty, DistillLoss, ModelConfig, StudentConfig, TeacherBuildConfig, TrainConfig
from clpd.curriculum.scorers import scorers
from clpd.files import plain_json
from clpd.models import architecture_config

log = logging.getLogger("clpd.ladder")

TrainFn = Callable[[DictConfig, Path, Console], dict]  # (config, run dir, console) -> summary: clpd.train.run_train
EvalFn = Callable[..., dict]  # clpd.evaluate.evaluate_checkpoint


@dataclass
class Ladder:
    """The ladder ready to load: ``specs`` point built from-scratch teachers at their checkpoints;
    ``rows`` (name, parameters, path, accuracy) go into ``teachers.json`` and the ladder table."""
    specs: List[ModelConfig]
    rows: List[dict]


# --- keys and folders ----------------------------------------------------------------------------

def build_config(spec: ModelConfig, tc: TrainConfig) -> TeacherBuildConfig:
    """How ``spec`` is trained: ``teachers.build`` with its ``teachers.build_overrides`` entry."""
    return replace(tc.teachers.build, **tc.teachers.build_overrides.get(spec.name, {}))


def teacher_key(spec: ModelConfig, tc: TrainConfig) -> str:
    """Cache key of a from-scratch teacher: its architecture, the data it learns from, and how it
    is trained. The name is left out (renaming a teacher does not retrain it)."""
    build = build_config(spec, tc)
    data = replace(tc.benchmark, seed=build.data_seed)
    payload = {"teacher": {k: v for k, v in plain_json(spec).items() if k != "name"},
               "data": plain_json(data), "build": {k: v for k, v in plain_json(build).items() if k != "eval"}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def teacher_dir(spec: ModelConfig, tc: TrainConfig) -> Path:
    return Path(tc.teachers.cache_dir) / f"{spec.name}-{teacher_key(spec, tc)}"


def _eval_dir(spec: ModelConfig, tc: TrainConfig) -> Path:
    return teacher_dir(spec, tc) / f"eval-{tc.benchmark.name.value}-seed{tc.benchmark.seed}"


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
                      eval_at_end=False)  # build_teacher evaluates on the student's test split instead
    return OmegaConf.structured(TrainConfig(student=student, benchmark=replace(tc.benchmark, seed=build.data_seed),
                                            trainer=trainer, seed=build.seed))


def build_teacher(spec: ModelConfig, tc: TrainConfig, console: Console, *, train: TrainFn,
                  evaluate: EvalFn) -> ModelConfig:
    """The spec of a loadable teacher: ``spec`` itself when it has weights, else the cached (and,
    the first time, freshly trained) checkpoint of its from-scratch architecture."""
    if spec.path is not None:
        return spec
    run_dir = teacher_dir(spec, tc)
    final = run_dir / "checkpoints" / "final"
    if final.exists():
        log.info("teacher %s: reusing %s", spec.name, final)
    else:
        console.print(f"[bold]training teacher {spec.name}[/] (from scratch, not in the cache yet) into {run_dir}",
                      soft_wrap=True)
        shutil.rmtree(run_dir, ignore_errors=True)  # an earlier attempt that did not finish
        train(teacher_train_config(spec, tc), run_dir, console)
    if tc.teachers.build.eval and teacher_accuracy(spec, tc) is None:
        # On the student's test split, so that teachers and students are scored on the same problems.
        evaluate(str(final), tc.benchmark, _eval_dir(spec, tc), console,
                 device=tc.trainer.device, precision=tc.trainer.precision)
    return replace(spec, path=str(final))


def count_spec_parameters(spec: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> Optional[int]:
    """Parameters of a teacher without loading its weights (a meta-device model); None if its
    config cannot be read (e.g. a hub id offline)."""
    try:
        config = architecture_config(spec, tokenizer) if spec.path is None else AutoConfig.from_pretrained(spec.path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in model.parameters())
    except (OSError, ValueError):
        return None


def check_ladder_order(ladder: Sequence[ModelConfig], tokenizer: PreTrainedTokenizerBase) -> List[Optional[int]]:
    """The parameter count of each rung; warns when they do not increase (weakest first)."""
    sizes = [count_spec_parameters(spec, tokenizer) for spec in ladder]
    known = [(s, spec.name) for s, spec in zip(sizes, ladder) if s is not None]
    if any(a[0] >= b[0] for a, b in zip(known, known[1:])):
        log.warning("the teacher ladder is not increasing in parameter count: %s",
                    ", ".join(f"{name} {s / 1e6:.2f}M" for s, name in known))
    return sizes


def ladder_row(spec: ModelConfig, parameters: Optional[int], accuracy: Optional[dict]) -> dict:
    return {"name": spec.name, "parameters": parameters, "path": spec.path,
            "accuracy_strict": accuracy and accuracy["accuracy_strict"],
            "by_difficulty": accuracy and accuracy["by_difficulty"]}


def ladder_needed(tc: TrainConfig) -> bool:
    """Whether a run builds and loads its ladder: to distil from it, to score difficulty by a
    teacher's loss, or to build it alone (``teachers.build_only``)."""
    return bool(tc.teachers.ladder) and (tc.teachers.build_only or tc.distill.loss != DistillLoss.sft
                                         or Difficulty.teacher_loss in scorers(tc.curriculum))


def build_ladder(tc: TrainConfig, tokenizer: PreTrainedTokenizerBase, console: Console, *, train: TrainFn,
                 evaluate: EvalFn) -> Ladder:
    """Every rung of ``teachers.ladder`` made loadable (from-scratch ones trained if missing), with
    its size and, for from-scratch teachers, its accuracy on the student's test split."""
    ladder = tc.teachers.ladder
    sizes = check_ladder_order(ladder, tokenizer)
    specs = [build_teacher(t, tc, console, train=train, evaluate=evaluate) for t in ladder]
    rows = [ladder_row(built, size, teacher_accuracy(t, tc) if t.path is None else None)
            for t, built, size in zip(ladder, specs, sizes)]
    return Ladder(specs, rows)


def ladder_table(rows: Sequence[dict], title: str = "teachers") -> Table:
    """The ladder (and, after training, the student) as a table: size, accuracy, by steps."""
    table = Table(title=title)
    for column in ("model", "parameters", "strict acc", "by steps"):
        table.add_column(column, justify="right" if column != "model" else "left")
    for r in rows:
        by = r["by_difficulty"] or {}
        table.add_row(r["name"], f"{r['parameters'] / 1e6:.2f}M" if r["parameters"] else "?",
                      f"{r['accuracy_strict']:.3f}" if r["accuracy_strict"] is not None else "-",
                      " ".join(f"{k}:{v['accuracy_strict']:.2f}" for k, v in by.items()))
    return table
