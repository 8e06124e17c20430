"""Sweeps on Hydra's launcher plugins (the optional extra ``pip install 'clpd[sweep]'``):
``hydra/launcher=joblib`` runs a sweep's jobs in parallel processes on this machine,
``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml, over hydra-submitit-launcher) as a SLURM
job array, ``hydra/launcher=submitit_local`` as local processes under submitit.

Threads under joblib: its loky backend starts each worker process with ``OMP_NUM_THREADS`` (and
MKL's, OpenBLAS's, ...) set to ``cores // n_jobs``, unless the variable is already set in the
environment, and torch takes its thread count from it when it starts in the worker. So ``n_jobs=2``
on 2 cores runs each job on one thread, with nothing for clpd to set; ``trainer.num_threads``
overrides it per run (``summary.json`` records the count each run used).

:class:`CheckLauncher` is a Hydra callback (``hydra.callbacks`` in conf/train.yaml and
conf/eval.yaml): before a sweep starts any job it refuses, in one line, launcher settings that
would fail in every job, and warns about threads that oversubscribe the cores.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from clpd.errors import ClpdError

log = logging.getLogger("clpd.launchers")

SWEEP_EXTRA = "pip install 'clpd[sweep]' (in a checkout: pip install -e '.[sweep]')"


def _cores() -> int:
    try:  # as joblib counts them (affinity and cgroup quotas), to say what its workers get
        from joblib import cpu_count

        return cpu_count()
    except ImportError:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def joblib_threads(n_jobs: int, num_threads: Optional[int]) -> int:
    """The torch threads of each run of a joblib sweep: ``trainer.num_threads``, else the
    ``OMP_NUM_THREADS`` of this environment, else what loky sets: cores // n_jobs (at least 1)."""
    if num_threads:
        return num_threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return max(_cores() // n_jobs, 1)


def check_launcher(config: DictConfig) -> None:
    """Refuse what the launcher of ``config`` (the sweep's composed config) cannot run, before any job."""
    launcher = config.hydra.launcher
    if "JoblibLauncher" not in str(launcher.get("_target_", "")):
        return
    n_jobs = launcher.n_jobs
    if n_jobs is None or n_jobs < 1:
        raise ClpdError(f"hydra.launcher.n_jobs={n_jobs}: the number of runs at once must be >= 1 (joblib's -1, one "
                        f"per core, is not taken: say how many, e.g. hydra.launcher.n_jobs={_cores()} on this "
                        f"machine's {_cores()} cores; each run then gets cores / n_jobs threads)")
    trainer = config.get("trainer")
    threads = joblib_threads(n_jobs, trainer.get("num_threads") if trainer is not None else None)
    if n_jobs * threads > _cores():
        log.warning("hydra.launcher.n_jobs=%d runs of %d threads each on %d cores: they will wait for each other "
                    "(set trainer.num_threads or unset OMP_NUM_THREADS)", n_jobs, threads, _cores())


class CheckLauncher(Callback):
    """Runs :func:`check_launcher` when a sweep starts (``-m``), before any job is launched."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_launcher(config)
        except ClpdError as exc:
            # Hydra turns a callback's exceptions into warnings and goes on; SystemExit stops it
            # (as clpd.commands.job.run_command stops a single run), with the one line.
            raise SystemExit(f"clpd {config.hydra.job.name}: error: {exc}") from None
