"""Run directories: the one Hydra chose, its ``status.json``, and a command run inside a Hydra job
(files are written through :mod:`clpd.files`, atomically)."""

from __future__ import annotations

import shlex
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from clpd.errors import ClpdError, Interrupted
from clpd.files import write_json
from clpd.training.signals import hand_on


def hydra_run_dir() -> Path:
    """The run dir Hydra chose (``hydra.run.dir`` or the sweep subdir); the cwd is not changed."""
    return Path(HydraConfig.get().runtime.output_dir)


@contextmanager
def recorded_status(run_dir: Path) -> Iterator[None]:
    """Write ``status.json`` (running, then ok, failed with the error, or interrupted with how it
    stopped) so that reports can list failed and unfinished runs instead of silently dropping them.
    Under torchrun rank 0 alone writes it."""
    from clpd.training.distributed import ranks  # torch: imported once a command runs, not to compose a config

    if not ranks().main:
        yield
        return
    write_json(run_dir / "status.json", {"status": "running"})
    try:
        yield
    except (Interrupted, KeyboardInterrupt) as exc:
        write_json(run_dir / "status.json", {"status": "interrupted", "error": str(exc) or "KeyboardInterrupt"})
        raise
    except BaseException as exc:
        error = str(exc) if isinstance(exc, ClpdError) else "".join(traceback.format_exception_only(exc)).strip()
        write_json(run_dir / "status.json", {"status": "failed", "error": error})
        raise
    write_json(run_dir / "status.json", {"status": "ok"})


def resume_command(command: str) -> str:
    """The command line that resumes this Hydra job: its overrides, its run dir, trainer.resume=auto."""
    overrides = [o for o in HydraConfig.get().overrides.task
                 if o.split("=", 1)[0].lstrip("+~") not in ("hydra.run.dir", "trainer.resume")]
    words = ["clpd", command, *overrides, f"hydra.run.dir={hydra_run_dir()}", "trainer.resume=auto"]
    return " ".join(shlex.quote(w) for w in words)


def run_command(command: str, run, cfg: DictConfig) -> Any:
    """Call ``run(cfg, run_dir)`` inside a Hydra job.

    In a single run a user error ends the process with one line (SystemExit passes through Hydra's
    job wrapper, which would otherwise add a line of its own). In a sweep the error is left to
    Hydra, so the other jobs still run and the failed one is recorded as failed.
    """
    from hydra.types import RunMode
    # transformers' own progress bars ("Loading weights", "Writing model shards") would interleave
    # with clpd's progress; clpd reports what it loads and saves itself. Imported here, once the
    # config is valid: a refused override does not wait for transformers to load.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return run(cfg, hydra_run_dir())
    except Interrupted as exc:  # a single run or a sweep: the user asked to stop, so stop
        how = f" To resume: {resume_command(command)}" if exc.resumable else ""
        from clpd.training.distributed import ranks

        if ranks().main:  # one line for the run, not one per rank
            print(f"clpd {command}: {exc}.{how}", file=sys.stderr, flush=True)
        if exc.hand_on is not None:  # the scheduler's notice: under submitit its handler requeues the job and exits
            hand_on(exc.hand_on)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C before training started (data, teachers, scoring): nothing to save
        print(f"clpd {command}: interrupted before training started; nothing was saved", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except ClpdError as exc:
        if HydraConfig.get().mode == RunMode.RUN:
            raise SystemExit(f"clpd {command}: error: {exc}") from None
        raise
