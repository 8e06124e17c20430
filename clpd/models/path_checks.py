"""Checks of a student's or teacher's local paths before anything loads: the model folder (or
its GGUF file), a clpd checkpoint's files, the tokenizer, ``pkg:`` paths; and a model's config
read without its weights (:func:`config_of`)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from clpd.training.checkpoint import CHECKPOINT_HINT, checkpoint_files_problem, COMPLETE, CONFIG_FILE, FINAL, latest_checkpoint
from clpd.config.model import ModelConfig
from clpd.errors import ClpdError
from clpd.models.load import (ADAPTER_CONFIG, architecture_config, check_source, gguf_reader_missing, local_source,
                             pretrained_source)
from clpd.config.package_paths import is_package_path, package_folder


MODEL_CONFIG = "config.json"  # transformers' CONFIG_NAME: a save_pretrained model folder



# What makes a local folder loadable as a model, in the order clpd's loader tries them.
MODEL_FILES = (MODEL_CONFIG, ADAPTER_CONFIG)



def local_folder(name: str) -> Optional[Path]:
    """The folder ``name`` names when clpd's loader would read it from disk (it exists here)."""
    try:
        path = Path(local_source(name))
    except ClpdError:  # a pkg: path whose package is not installed: refused by no_such_path
        return None
    return path if path.exists() else None



def model_folder_problem(name: str, key: str, gguf_file: Optional[str] = None,
                         gguf_key: str = "gguf_file") -> Optional[str]:
    """Why the local path ``name`` (given as ``key``) is not a model folder, or None.

    A model folder has config.json (any save_pretrained folder, a clpd checkpoint without LoRA),
    adapter_config.json (a LoRA adapter), or holds ``gguf_file``. A clpd checkpoint's files are
    checked by name and size too."""
    try:
        folder = Path(local_source(name))  # a pkg: path: its package's folder
    except ClpdError as exc:
        return f"{key}={name}: {str(exc).split(': ', 1)[-1]}"
    if not folder.is_dir():
        return (f"{key}={name}: a file, not a model folder (for a GGUF file set {key} to its folder and "
                f"{gguf_key} to its name)")
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if gguf_file is not None:
        if not (folder / gguf_file).is_file():
            return (f"{gguf_key}={gguf_file}: no such file in {key}={name} "
                    f"(GGUF files there: {', '.join(ggufs) if ggufs else 'none'})")
        return None
    if (folder / COMPLETE).exists() or (folder / CONFIG_FILE).exists() or folder.name.endswith(".tmp"):
        problem = checkpoint_files_problem(folder, key)
        if problem:
            return problem
    if any((folder / f).is_file() for f in MODEL_FILES):
        return None
    hints = []
    run_checkpoint = latest_checkpoint(folder)
    if run_checkpoint is not None:
        hints.append(f"it is a run folder: did you mean {key}={run_checkpoint}?")
    elif (folder / FINAL).is_dir() or (folder / "checkpoints").is_dir():
        hints.append("it looks like a run folder, but holds no complete checkpoint")
    if ggufs:
        hints.append(f"it holds GGUF files: set {gguf_key}= one of {', '.join(ggufs)}")
    return (f"{key}={name}: not a checkpoint or model folder: found none of {', '.join(MODEL_FILES)} there "
            f"({CHECKPOINT_HINT}; a Hugging Face model folder has {MODEL_CONFIG})"
            + "".join(f"; {h}" for h in hints))



def no_such_path(key: str, value: str, label: str) -> Optional[str]:
    if is_package_path(value):
        try:
            package_folder(value)
        except ClpdError as exc:  # "pkg:x: the Python package x is not installed here (how to install it)"
            return f"{key}={value}{label}: {str(exc).split(': ', 1)[-1]}"
        return None
    try:
        check_source(value, key)
    except ClpdError:
        return f"{key}={value}{label}: no such file or folder"
    return None



def gguf_problem(key: str, gguf_file: Optional[str], label: str = "") -> Optional[str]:
    if gguf_file and gguf_reader_missing():
        return (f"{key}={gguf_file}{label}: reading a GGUF file needs the gguf package, which is not installed "
                f"(pip install gguf)")
    return None



def model_paths_problems(spec: ModelConfig, key: str, who: str = "") -> List[str]:
    """The local paths of a student or teacher: model folder (or GGUF file in it) and tokenizer."""
    label = f" ({who})" if who else ""
    if spec.path is None:
        missing = spec.tokenizer is not None and no_such_path(f"{key}.tokenizer", spec.tokenizer, label)
        return [missing] if missing else []
    missing = no_such_path(f"{key}.path", spec.path, label)
    if missing:
        return [missing]
    if local_folder(spec.path) is not None:
        problem = model_folder_problem(spec.path, f"{key}.path", spec.gguf_file, f"{key}.gguf_file")
        if problem:  # the teacher's name right after its key
            return [problem.replace(f"={spec.path}:", f"={spec.path}{label}:", 1)
                    .replace(f"={spec.gguf_file}:", f"={spec.gguf_file}{label}:", 1)]
    gguf = gguf_problem(f"{key}.gguf_file", spec.gguf_file, label)
    return [gguf] if gguf else []



def config_of(spec: ModelConfig, tokenizer=None):
    """``spec``'s transformers config without its weights (None when it cannot be read here: a
    hub id offline, an adapter folder; the loader then says why)."""
    from transformers import AutoConfig

    if spec.path is None:
        return architecture_config(spec, tokenizer) if tokenizer is not None else None
    folder = local_folder(spec.path)
    if folder is not None and (folder / ADAPTER_CONFIG).is_file():
        return None  # an adapter checkpoint: its base decides
    try:
        path, gguf_file = (pretrained_source(spec, f"model '{spec.name}'") if spec.gguf_file
                           else (str(folder) if folder is not None else spec.path, None))
        return AutoConfig.from_pretrained(path, gguf_file=gguf_file, trust_remote_code=spec.trust_remote_code)
    except Exception:  # no network, no cached config, an unknown architecture: checked at load time
        return None
