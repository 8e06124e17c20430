"""Run directories and what is written into them: atomically, so nothing is ever half-written."""

from __future__ import annotations

import json
import os
import shutil
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from clpd.errors import ClpdError

CONFIG_FILE = "clpd_config.yaml"  # the resolved run config, saved beside each checkpoint


def hydra_run_dir() -> Path:
    """The run dir Hydra chose (``hydra.run.dir`` or the sweep subdir); the cwd is not changed."""
    return Path(HydraConfig.get().runtime.output_dir)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def save_checkpoint(model, tokenizer, cfg: DictConfig, path: Path, base=None) -> None:
    """``save_pretrained`` into ``path.tmp``, then rename: a crash leaves no half checkpoint.

    A peft model saves only its adapter; ``base`` (a from-scratch base model, which exists nowhere
    else) is then saved into ``base/`` beside it, where clpd's loader looks first.
    """
    if path.exists():
        raise ClpdError(f"{path} already exists; refusing to overwrite a checkpoint (choose another hydra.run.dir)")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if base is not None:
        base.save_pretrained(tmp / "base")
        tokenizer.save_pretrained(tmp / "base")
    OmegaConf.save(cfg, tmp / CONFIG_FILE, resolve=True)
    os.replace(tmp, path)


@contextmanager
def recorded_status(run_dir: Path) -> Iterator[None]:
    """Write ``status.json`` (running, then completed or failed with the error) so that reports
    can list failed and unfinished runs instead of silently dropping them."""
    write_json(run_dir / "status.json", {"status": "running"})
    try:
        yield
    except BaseException as exc:
        error = str(exc) if isinstance(exc, ClpdError) else "".join(traceback.format_exception_only(exc)).strip()
        write_json(run_dir / "status.json", {"status": "failed", "error": error})
        raise
    write_json(run_dir / "status.json", {"status": "completed"})


def run_command(command: str, run, cfg: DictConfig) -> Any:
    """Call ``run(cfg, run_dir)`` inside a Hydra job.

    In a single run a user error ends the process with one line (SystemExit passes through Hydra's
    job wrapper, which would otherwise add a line of its own). In a sweep the error is left to
    Hydra, so the other jobs still run and the failed one is recorded as failed.
    """
    from hydra.types import RunMode

    try:
        return run(cfg, hydra_run_dir())
    except ClpdError as exc:
        if HydraConfig.get().mode == RunMode.RUN:
            raise SystemExit(f"clpd {command}: error: {exc}") from None
        raise
