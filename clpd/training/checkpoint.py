"""Checkpoints that survive a kill, and exact resume.

A checkpoint is a folder that ``clpd eval`` and ``AutoModelForCausalLM.from_pretrained`` read as
it is (the student's weights or LoRA adapter, its tokenizer, ``base/`` for a from-scratch LoRA
base), plus what resuming needs:

- ``training_state.pt``: the loop's :class:`~clpd.training.loop.TrainState` as a dict: optimizer,
  GradScaler, RNG states (python, numpy, torch, CUDA), the step and tokens read (the sampler's
  batches are a function of (seed, step), the LR schedule one of the schedule step), the active
  teacher, the skipped steps and the teacher switches so far. States written before TrainState
  existed hold the same keys and are read as well;
- ``metrics.jsonl``: the run's log up to this step (a resumed run continues it line for line);
- ``manifest.json``: the resolved config and hashes of the teacher ladder (names and weight
  files), of the training data and of the difficulty scores, which resume compares;
- ``COMPLETE``, written last: every file's size and sha256.

Everything is written into a ``.tmp`` folder beside it and renamed into place
(:func:`clpd.files.atomic_path`), so a save killed half-way never looks like a checkpoint; the marker also catches a checkpoint truncated or corrupted afterwards
(a partial copy, a bad disk).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from clpd.errors import ClpdError
from clpd.files import atomic_path
from clpd.training.state import TrainState

CONFIG_FILE = "clpd_config.yaml"  # the resolved run config
STATE_FILE = "training_state.pt"
METRICS_FILE = "metrics.jsonl"
MANIFEST_FILE = "manifest.json"
COMPLETE = "COMPLETE"
FINAL = "final"
CHECKPOINT_HINT = "a clpd checkpoint is <run>/checkpoints/final or <run>/checkpoints/step-N"
STEP_DIR = re.compile(r"^step-(\d+)$")

# Keys that may change between a run and its resume: where and how often it saves, logs and
# evaluates, how it resumes, how many CPU threads it uses, and where the teacher cache lies (a sweep
# continued from a copy, scripts/archive_runs.sh: the teachers' weights are compared by sha256, not
# by folder). Anything else changes what is trained.
RESUME_FREE_KEYS = ("trainer.resume", "trainer.resume_force", "trainer.save_every", "trainer.keep_last",
                    "trainer.num_threads", "trainer.tensorboard", "trainer.log_every", "trainer.eval_every",
                    "trainer.eval_every_limit", "trainer.eval_batch_size", "trainer.eval_max_new_tokens",
                    "trainer.eval_at_end", "trainer.eval_calculator", "teachers.cache_dir")


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)


def write_checkpoint(path: Path, *, model, tokenizer, cfg: DictConfig, base=None, state: Optional[TrainState] = None,
                     manifest: Optional[dict] = None, metrics: Optional[Path] = None) -> float:
    """Write a checkpoint into ``path`` atomically; returns the seconds it took.

    A peft model saves only its adapter; ``base`` (a from-scratch base model, which exists nowhere
    else) is saved into ``base/`` beside it, where clpd's loader looks first. Any OSError (a full
    disk, a lost mount) removes the partial ``.tmp`` folder and is reported as a ClpdError that
    says the checkpoints already written are intact.
    """
    if path.exists():
        raise ClpdError(f"{path} already exists; refusing to overwrite a checkpoint (choose another hydra.run.dir)")
    started = time.perf_counter()
    try:
        with atomic_path(path) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if base is not None:
                base.save_pretrained(tmp / "base")
                tokenizer.save_pretrained(tmp / "base")
            OmegaConf.save(cfg, tmp / CONFIG_FILE, resolve=True)
            if state is not None:
                torch.save(state.to_dict(), tmp / STATE_FILE)
            if manifest is not None:
                (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            if metrics is not None and metrics.exists():
                shutil.copyfile(metrics, tmp / METRICS_FILE)
            files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in _files(tmp)}
            (tmp / COMPLETE).write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")
    except OSError as exc:
        kept = [p.name for p in complete_checkpoints(path.parent)]
        intact = f"the checkpoints written before are intact ({', '.join(kept)})" if kept else "no earlier checkpoint exists"
        raise ClpdError(f"could not write checkpoint {path}: {exc.strerror or exc}; {intact}") from exc
    return time.perf_counter() - started


def verify_checkpoint(path: Path, *, hashes: bool = True) -> None:
    """Raise a ClpdError naming the problem when ``path`` is not a complete, intact checkpoint:
    its marker, every file it lists, their sizes and (``hashes``) their sha256. Without hashes
    the check reads no file's content: cheap enough for a check before any work."""
    marker = path / COMPLETE
    if not marker.exists():
        raise ClpdError(f"checkpoint {path} is incomplete: it has no {COMPLETE} marker (the save did not finish, "
                        f"or the folder was copied in part)")
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise ClpdError(f"checkpoint {path}: its {COMPLETE} marker is unreadable ({exc})") from exc
    for name, expected in sorted(files.items()):
        file = path / name
        if not file.exists():
            raise ClpdError(f"checkpoint {path} is damaged: {name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise ClpdError(f"checkpoint {path} is damaged: {name} has {size} bytes, {expected['bytes']} were written "
                            f"(truncated?)")
        if hashes and sha256_file(file) != expected["sha256"]:
            raise ClpdError(f"checkpoint {path} is damaged: {name} does not match the sha256 written with it")


def is_clpd_checkpoint(path: Path) -> bool:
    return path.is_dir() and ((path / CONFIG_FILE).exists() or (path / COMPLETE).exists())


def checkpoint_step(path: Path) -> Optional[int]:
    """N of a ``step-N`` checkpoint folder; None for ``final`` and anything else."""
    m = STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def complete_checkpoints(folder: Path) -> List[Path]:
    """The ``step-N`` checkpoints of ``folder`` (a run's ``checkpoints/``) that finished, oldest first."""
    if not folder.is_dir():
        return []
    steps = [(step, p) for p in folder.iterdir() if (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(steps) if (p / COMPLETE).exists()]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run: ``final`` if the run finished, else the last step."""
    folder = run_dir / "checkpoints"
    if (folder / FINAL / COMPLETE).exists():
        return folder / FINAL
    steps = complete_checkpoints(folder)
    return steps[-1] if steps else None


def prune_checkpoints(folder: Path, keep_last: int) -> List[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints (``final`` is never touched), and
    any ``.tmp`` leftovers of saves that were killed."""
    removed = complete_checkpoints(folder)[:-keep_last] if keep_last > 0 else []
    removed += [p for p in folder.glob("*.tmp") if p.is_dir()]
    for p in removed:
        shutil.rmtree(p)
    return removed


# --- what a checkpoint holds besides the weights ------------------------------------------------

def load_training_state(path: Path) -> TrainState:
    verify_checkpoint(path)
    if not (path / STATE_FILE).exists():
        raise ClpdError(f"checkpoint {path} has no {STATE_FILE}: it holds weights only and cannot be resumed from")
    # weights_only: a checkpoint is data, never code (tensors, numbers, strings, lists, dicts)
    return TrainState.from_dict(torch.load(path / STATE_FILE, map_location="cpu", weights_only=True), str(path))


def load_student_weights(model, path: Path) -> None:
    """Put the checkpoint's weights into ``model`` (built as the run builds it), in place, bit for bit."""
    from peft import PeftModel, load_peft_weights, set_peft_model_state_dict

    if isinstance(model, PeftModel):
        result = set_peft_model_state_dict(model, load_peft_weights(str(path), device="cpu"))
        if result.unexpected_keys:
            raise ClpdError(f"checkpoint {path}: the adapter has weights the student lacks: {result.unexpected_keys[:3]}")
        return
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(str(path), dtype=next(model.parameters()).dtype)
    model.load_state_dict(saved.state_dict())


# --- the manifest: what a resume must agree with -----------------------------------------------

def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        out: Dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def weights_fingerprint(source: str) -> Dict[str, str]:
    """sha256 of a model's weight files: the files of a local folder, or, for a hub id, the blob
    names of its cached snapshot (the hub names LFS blobs by their sha256, so nothing is read)."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True,
                                            allow_patterns=["*.safetensors", "*.bin", "*.gguf"]))
        except Exception:  # not cached locally: the name is all there is to compare
            return {"unresolved": source}
        return {p.name: Path(os.path.realpath(p)).name for p in sorted(folder.iterdir()) if p.is_file()}
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.suffix in (".safetensors", ".bin", ".gguf") and p.is_file()}


def make_manifest(cfg: DictConfig, *, teachers: List[dict], data: str, scores: Optional[List[float]]) -> dict:
    """``teachers``: ``{"name", "source"}`` of each rung of the ladder in use (source: a folder or hub id)."""
    return {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "ladder": [{"name": t["name"], "source": t["source"], "weights": weights_fingerprint(t["source"])} for t in teachers],
        "data": data,
        "difficulty": None if scores is None else hashlib.sha256(json.dumps([round(float(s), 6) for s in scores]).encode()).hexdigest(),
    }


def manifest_differences(saved: dict, current: dict) -> List[str]:
    """What differs between a checkpoint's manifest and this run, one phrase per difference."""
    out: List[str] = []
    old, new = _flatten(saved.get("config", {})), _flatten(current.get("config", {}))
    for key in sorted(set(old) | set(new)):
        if key in RESUME_FREE_KEYS or key.startswith("hydra."):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            out.append(f"{key}: {old.get(key, '<absent>')} -> {new.get(key, '<absent>')}")
    old_ladder = {t["name"]: t for t in saved.get("ladder", [])}
    new_ladder = {t["name"]: t for t in current.get("ladder", [])}
    if list(old_ladder) != list(new_ladder):
        out.append(f"teacher ladder: {list(old_ladder)} -> {list(new_ladder)}")
    for name in old_ladder.keys() & new_ladder.keys():
        if old_ladder[name]["weights"] != new_ladder[name]["weights"]:
            out.append(f"teacher {name}: its weight files differ ({old_ladder[name]['source']} -> {new_ladder[name]['source']})")
    if saved.get("data") != current.get("data"):
        out.append("training data: the encoded examples differ")
    if saved.get("difficulty") != current.get("difficulty"):
        out.append("difficulty scores differ")
    return out


def checkpoint_files_problem(path: Path, key: str) -> Optional[str]:
    """A clpd checkpoint's marker and files, by name and size (the sha256 is left to the load)."""
    try:
        verify_checkpoint(path, hashes=False)
    except ClpdError as exc:
        return f"{key}: {exc}"
    return None
