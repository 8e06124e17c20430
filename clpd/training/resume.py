"""Resume policy: which checkpoint a run continues from, and what it refuses.

- ``finished_run``: ``trainer.resume=auto`` on a run that already finished is a no-op (so a sweep
  launched again continues where it stopped and skips what is done), if it is the same run.
- ``resume_source``: the checkpoint to continue from; refuses to start over a run's checkpoints
  or to resume an earlier checkpoint into a folder that holds later ones (which it would overwrite).
- ``resume_student``: checks a checkpoint's manifest against this run, loads its weights and its
  ``metrics.jsonl``, and returns the :class:`~clpd.training.loop.TrainState` to continue from.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from clpd.training.checkpoint import (CHECKPOINT_HINT, COMPLETE, STATE_FILE, checkpoint_files_problem, latest_checkpoint, FINAL, MANIFEST_FILE, METRICS_FILE, checkpoint_step, complete_checkpoints,
                             load_student_weights, load_training_state, manifest_differences)
from clpd.config.schema import TrainerConfig
from clpd.training.distributed import ranks
from clpd.errors import ClpdError
from clpd.training.state import TrainState

log = logging.getLogger("clpd.training.resume")


def finished_run(cfg: DictConfig, run_dir: Path, console: Console) -> Optional[dict]:
    """The summary of the finished run in ``run_dir`` when ``trainer.resume=auto`` asks to continue
    it (nothing to do); None when ``run_dir`` holds no finished run. Any other finished run there
    is refused: it would be overwritten."""
    if not ((run_dir / "checkpoints" / FINAL).exists() or (run_dir / "summary.json").exists()):
        return None
    if cfg.trainer.resume != "auto" or not (run_dir / "summary.json").exists():
        raise ClpdError(f"{run_dir} already holds a finished run; choose another hydra.run.dir")
    manifest = run_dir / "checkpoints" / FINAL / MANIFEST_FILE
    if manifest.exists():
        saved = {"config": json.loads(manifest.read_text())["config"]}
        differences = manifest_differences(saved, {"config": OmegaConf.to_container(cfg, resolve=True)})
        if differences:
            raise ClpdError(f"{run_dir} already holds a finished run with another config ({'; '.join(differences)}); "
                            f"choose another hydra.run.dir")
    console.print(f"{run_dir} already finished (trainer.resume=auto): nothing to resume", soft_wrap=True)
    return json.loads((run_dir / "summary.json").read_text())


def resume_source(trainer: TrainerConfig, run_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from, or None; refuses what would lose or mix up work."""
    steps = complete_checkpoints(run_dir / "checkpoints")
    if trainer.resume is None:
        if steps:
            raise ClpdError(f"{run_dir} holds checkpoints of an unfinished run ({steps[-1].name}); continue it with "
                            f"trainer.resume=auto, or choose another hydra.run.dir")
        return None
    if trainer.resume == "auto":
        if not steps:
            log.info("trainer.resume=auto: no checkpoint in %s yet; starting from step 0", run_dir / "checkpoints")
        return steps[-1] if steps else None
    source = Path(trainer.resume).expanduser().resolve()
    source_step = checkpoint_step(source)  # None for ``final`` or a folder elsewhere: every step is later
    later = [p.name for p in steps
             if p.resolve() != source and (source_step is None or checkpoint_step(p) > source_step)]
    if later:
        raise ClpdError(f"trainer.resume={trainer.resume}: {run_dir} already holds later checkpoints ({', '.join(later)}), "
                        f"which resuming from an earlier one would overwrite; resume with trainer.resume=auto or "
                        f"choose another hydra.run.dir")
    return source


def resume_student(source: Path, manifest: dict, model, run_dir: Path, console: Console, *,
                   force: bool) -> TrainState:
    """Check ``source`` against this run (``force``: warn instead of refusing), load its weights
    into ``model`` and its log into the run dir; returns the training state to continue from."""
    state = load_training_state(source)  # verifies the checkpoint first
    saved = json.loads((source / MANIFEST_FILE).read_text())
    differences = manifest_differences(saved, manifest)
    if differences and not force:
        raise ClpdError(f"trainer.resume: {source} was written by a different run: {'; '.join(differences)}. "
                        f"Resume with the same settings, or set trainer.resume_force=true")
    for d in differences:
        log.warning("resuming despite a difference (trainer.resume_force=true): %s", d)
    load_student_weights(model, source)
    # The log continues from the checkpoint's copy: lines written after it (by the stopped run) go.
    if ranks().main:
        shutil.copyfile(source / METRICS_FILE, run_dir / "metrics.jsonl")
    console.print(f"resuming from {source} at step {state.step} ({state.tokens_seen:,} tokens read)", soft_wrap=True)
    return state


def resume_problem(resume: Optional[str]) -> Optional[str]:
    """``trainer.resume=PATH``: a clpd checkpoint written with its training state."""
    if resume is None or resume == "auto":
        return None
    path = Path(resume).expanduser()
    if not path.is_dir():
        return None  # the schema check already refused it
    if not (path / COMPLETE).exists():
        hint = ""
        latest = latest_checkpoint(path) or latest_checkpoint(path.parent)
        if latest is not None:
            hint = f"; did you mean trainer.resume={latest}?"
        return (f"trainer.resume={resume}: not a clpd checkpoint: found no {COMPLETE} marker and no {STATE_FILE} there "
                f"({CHECKPOINT_HINT}; or trainer.resume=auto with hydra.run.dir=<run>){hint}")
    problem = checkpoint_files_problem(path, "trainer.resume")
    if problem:
        return problem
    if not (path / STATE_FILE).is_file():
        return (f"trainer.resume={resume}: the checkpoint has no {STATE_FILE}: it holds weights only and cannot be "
                f"resumed from (start a new run from its weights with student.path={resume})")
    return None
