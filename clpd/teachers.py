"""The teacher ladder: building the from-scratch teachers, the schedule, and device residency.

* ``build_ladder`` turns each ladder entry into something loadable: a pretrained teacher is used
  as it is; a from-scratch teacher without weights is trained first by an ordinary supervised
  ``clpd train`` run into a cache dir keyed by its config, its data and its seed, and reused after.
* ``teacher_index`` is the schedule: a pure function from the step to the teacher's index.
* ``TeacherPool`` keeps only the active teacher loaded; a switch frees the old one first.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from omegaconf import OmegaConf
from rich.console import Console
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from clpd.config import ModelConfig, Schedule, StudentConfig, TeacherBuildConfig, TeachersConfig, TrainConfig
from clpd.curriculum.stages import stage_at
from clpd.errors import ClpdError
from clpd.models import architecture_config, load_model

log = logging.getLogger("clpd.teachers")


# ---------------------------------------------------------------------------------------------
# Building the ladder
# ---------------------------------------------------------------------------------------------

def _plain(obj) -> dict:
    """A dataclass as JSON-able plain data (enums by value), for hashing."""
    return json.loads(json.dumps(asdict(obj), default=lambda v: getattr(v, "value", str(v)), sort_keys=True))


def build_config(spec: ModelConfig, tc: TrainConfig) -> TeacherBuildConfig:
    """How ``spec`` is trained: ``teachers.build`` with its ``teachers.build_overrides`` entry."""
    return replace(tc.teachers.build, **tc.teachers.build_overrides.get(spec.name, {}))


def teacher_key(spec: ModelConfig, tc: TrainConfig) -> str:
    """Cache key of a from-scratch teacher: its architecture, the data it learns from, and how it
    is trained. The name is left out (renaming a teacher does not retrain it)."""
    build = build_config(spec, tc)
    data = replace(tc.benchmark, seed=build.data_seed)
    payload = {"teacher": {k: v for k, v in _plain(spec).items() if k != "name"},
               "data": _plain(data), "build": {k: v for k, v in _plain(build).items() if k != "eval"}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def teacher_dir(spec: ModelConfig, tc: TrainConfig) -> Path:
    return Path(tc.teachers.cache_dir) / f"{spec.name}-{teacher_key(spec, tc)}"


def _teacher_train_config(spec: ModelConfig, tc: TrainConfig):
    build = build_config(spec, tc)
    student = StudentConfig(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(ModelConfig)})
    trainer = replace(tc.trainer, max_steps=build.max_steps, batch_size=build.batch_size, grad_accum=build.grad_accum,
                      lr=build.lr, warmup_steps=build.warmup_steps, save=True, max_tokens=None,
                      eval_every=None, save_every=None, resume=None, resume_force=False,
                      eval_at_end=False)  # build_teacher evaluates on the student's test split instead
    return OmegaConf.structured(TrainConfig(student=student, benchmark=replace(tc.benchmark, seed=build.data_seed),
                                            trainer=trainer, seed=build.seed))


def build_teacher(spec: ModelConfig, tc: TrainConfig, console: Console) -> ModelConfig:
    """The spec of a loadable teacher: ``spec`` itself when it has weights, else the cached (and,
    the first time, freshly trained) checkpoint of its from-scratch architecture."""
    if spec.path is not None:
        return spec
    from clpd.eval import evaluate_checkpoint  # late imports: train imports this module
    from clpd.train import run_train

    run_dir = teacher_dir(spec, tc)
    final = run_dir / "checkpoints" / "final"
    if final.exists():
        log.info("teacher %s: reusing %s", spec.name, final)
    else:
        console.print(f"[bold]training teacher {spec.name}[/] (from scratch, not in the cache yet) into {run_dir}",
                      soft_wrap=True)
        shutil.rmtree(run_dir, ignore_errors=True)  # an earlier attempt that did not finish
        run_train(_teacher_train_config(spec, tc), run_dir, console)
    if tc.teachers.build.eval and teacher_accuracy(spec, tc) is None:
        # On the student's test split, so that teachers and students are scored on the same problems.
        evaluate_checkpoint(str(final), tc.benchmark, _eval_dir(spec, tc), console,
                            device=tc.trainer.device, precision=tc.trainer.precision)
    return replace(spec, path=str(final))


def _eval_dir(spec: ModelConfig, tc: TrainConfig) -> Path:
    return teacher_dir(spec, tc) / f"eval-{tc.benchmark.name.value}-seed{tc.benchmark.seed}"


def teacher_accuracy(spec: ModelConfig, tc: TrainConfig) -> Optional[dict]:
    """The cached test metrics of a built from-scratch teacher on the student's test split."""
    path = _eval_dir(spec, tc) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


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
    sizes = [count_spec_parameters(spec, tokenizer) for spec in ladder]
    known = [(s, spec.name) for s, spec in zip(sizes, ladder) if s is not None]
    if any(a[0] >= b[0] for a, b in zip(known, known[1:])):
        log.warning("the teacher ladder is not increasing in parameter count: %s",
                    ", ".join(f"{name} {s / 1e6:.2f}M" for s, name in known))
    return sizes


def check_vocabularies(student_tok: PreTrainedTokenizerBase, student_name: str,
                       teachers: Sequence[tuple[str, PreTrainedTokenizerBase]]) -> None:
    """Token-level distillation compares distributions row by row: the tokenizers must agree."""
    vocab = student_tok.get_vocab()
    for name, tok in teachers:
        if tok.get_vocab() != vocab:
            raise ClpdError(f"teacher '{name}' ({len(tok)} tokens, {tok.name_or_path}) and student '{student_name}' "
                            f"({len(student_tok)} tokens, {student_tok.name_or_path}) have different tokenizers; "
                            f"token-level distillation needs one shared vocabulary")


# ---------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------

def teacher_index(step: int, *, schedule: Schedule, num_teachers: int, starts: Sequence[int],
                  fixed_index: int = 0) -> int:
    """Which teacher of the ladder (0 = weakest) supervises ``step``.

    ``starts`` are the first steps of stages 1..K-1 (from even stages, ``teachers.boundaries``, or
    the curriculum); ``progressive`` gives teacher k to stage k.
    """
    if schedule == Schedule.strongest:
        return num_teachers - 1
    if schedule == Schedule.weakest:
        return 0
    if schedule == Schedule.fixed:
        return fixed_index
    return min(stage_at(step, starts), num_teachers - 1)


def make_schedule(cfg: TeachersConfig, starts: Sequence[int]) -> Callable[[int], int]:
    """The schedule of ``cfg`` over stages beginning at ``starts`` (from clpd.curriculum.stages)."""
    names = [t.name for t in cfg.ladder]
    fixed_index = names.index(cfg.fixed) if cfg.schedule == Schedule.fixed else 0
    return lambda step: teacher_index(step, schedule=cfg.schedule, num_teachers=len(names), starts=starts,
                                      fixed_index=fixed_index)


# ---------------------------------------------------------------------------------------------
# Residency
# ---------------------------------------------------------------------------------------------

class TeacherPool:
    """Loads teachers on demand and keeps only the active one: on a switch the old teacher is
    released (and CUDA's cache emptied) *before* the new one is loaded, so the device never holds
    two. Teachers are frozen, in eval mode, in ``dtype`` (bf16 on CUDA)."""

    def __init__(self, specs: Sequence[ModelConfig], tokenizer: PreTrainedTokenizerBase, *,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.specs = list(specs)
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.active_index: Optional[int] = None
        self.model: Optional[torch.nn.Module] = None

    def get(self, index: int) -> tuple[torch.nn.Module, bool]:
        """The teacher ``index``, and whether this call switched to it."""
        if index == self.active_index:
            return self.model, False
        self.release()
        model = load_model(self.specs[index], self.tokenizer, dtype=self.dtype)
        model.requires_grad_(False)
        self.model = model.to(self.device).eval()
        self.active_index = index
        return self.model, True

    def name(self, index: Optional[int]) -> Optional[str]:
        return None if index is None else self.specs[index].name

    def release(self) -> None:
        self.model = None
        self.active_index = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def teacher_dtype(autocast_dtype: Optional[torch.dtype]) -> torch.dtype:
    """Teachers only run forward passes: in the autocast dtype when there is one (bf16 on CUDA)."""
    return autocast_dtype or torch.float32


def summarize_ladder(specs: Sequence[ModelConfig], sizes: Sequence[Optional[int]],
                     accuracies: Sequence[Optional[dict]]) -> List[Dict]:
    rows = []
    for spec, size, acc in zip(specs, sizes, accuracies):
        rows.append({"name": spec.name, "parameters": size, "path": spec.path,
                     "accuracy_strict": acc and acc["accuracy_strict"], "by_difficulty": acc and acc["by_difficulty"]})
    return rows
