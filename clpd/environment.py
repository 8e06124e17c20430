"""The one probe of the machine and the process: what a run records about where it ran
(:func:`environment`) and how much memory it took (:func:`peak_rss_mib`, :func:`reset_peak_rss`) or may take
(:func:`mem_available_mib`).
Runs (``summary.json``), evaluations (``metrics.json``) and the benchmarks (:mod:`clpd.bench`) all
read them here."""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path
from typing import List, Optional


def _read_lines(path: str) -> List[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), or what ``platform`` knows of it."""
    return next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
                platform.processor() or platform.machine())


def launched_by_torchrun() -> bool:
    """Whether torchrun started this process as one of several ranks (read without importing torch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def environment(device) -> dict:
    """What else a bit-for-bit rerun must match: the same run on another thread count, torch
    version or processor reaches other weights (another summation order, other kernels)."""
    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device), "cpu": cpu_name()}


def peak_rss_mib(key: str = "VmHWM") -> float:
    """This process's peak resident memory (``VmHWM``, which :func:`reset_peak_rss` resets) or its
    current one (``key="VmRSS"``), in MiB; the peak since start (``ru_maxrss``) where /proc has none."""
    for line in _read_lines("/proc/self/status"):
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return max_rss_mib()


def max_rss_mib() -> float:
    """The peak resident memory of this process since it started, in MiB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def mem_available_mib() -> Optional[float]:
    """Memory the machine can give a new process without swapping (``MemAvailable``), in MiB; None where /proc has none."""
    return next((int(line.split()[1]) / 1024 for line in _read_lines("/proc/meminfo") if line.startswith("MemAvailable:")),
                None)


def reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS; False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
