"""Shared caches: folders that one process builds and any number of runs then read.

The trained from-scratch teachers (``teachers.cache_dir``) are such a cache, and so will be stored
teacher outputs. Runs started at once on an empty cache (the jobs of a parallel sweep, two users)
must not both build the same entry, nor see one half-built. So every entry is built like this:

    with build_lock(folder, what="teacher small"):   # the others wait here, and say for whom
        if complete(folder): reuse it                  # built by the run we waited for
        else: build into <folder>.<pid>-<random>.tmp, then rename it to <folder>

:func:`build_once` is that recipe. The lock is a real OS file lock (``filelock``: ``flock`` on
``.locks/<name>.lock`` beside the entry): the kernel releases it when its holder dies, however it dies,
so a killed build never leaves a stale lock, and the next run that takes the lock builds the entry
again. A build killed half-way leaves only its ``.tmp`` folder, which never looks complete and is
removed by the next builder. The cache folder must be on a file system with working ``flock``
(a local disk, NFSv4; Lustre mounted with ``-o flock``); where it has none, filelock falls back to
a lock file that a killed holder leaves behind (and warns).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from filelock import FileLock, Timeout

from clpd.files import atomic_path, write_json

log = logging.getLogger("clpd.cache")

WAIT_REPORT_S = 300.0  # while waiting for another builder, say so again this often


def lock_path(folder: Path) -> Path:
    """The lock of cache entry ``folder``: ``.locks/<name>.lock`` beside it (not inside: the entry
    is renamed into place; and kept: removing a lock file others may have open would split them)."""
    return folder.parent / ".locks" / f"{folder.name}.lock"


def _holder_path(folder: Path) -> Path:
    # Who holds the lock, for the runs that wait. Not in the lock file: filelock truncates that one
    # on every attempt to take it.
    return folder.parent / ".locks" / f"{folder.name}.holder.json"


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)}


def describe_holder(folder: Path) -> str:
    """Who is building ``folder`` now, as one phrase (for the log line of a run that waits)."""
    try:
        h = json.loads(_holder_path(folder).read_text())
        return f"pid {h['pid']} on {h['host']} (since {h['since']}: {h['command']})"
    except (OSError, ValueError, KeyError):  # between its taking the lock and writing this file
        return "another process"


@contextmanager
def build_lock(folder: str | os.PathLike, *, what: str, report_every_s: float = WAIT_REPORT_S) -> Iterator[None]:
    """Hold the lock of cache entry ``folder`` for the block. While another process holds it, wait
    (as long as it takes: a build may take an hour) and log that this run waits, for what and for
    whom, again every ``report_every_s`` seconds."""
    folder = Path(folder)
    lock_path(folder).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(folder)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("%s: waiting for %s to finish building %s", what, describe_holder(folder), folder)
        waited = time.monotonic()
        while True:
            try:
                lock.acquire(timeout=report_every_s)
                break
            except Timeout:
                log.warning("%s: still waiting (%.0f s) for %s", what, time.monotonic() - waited, describe_holder(folder))
        log.info("%s: the lock is free after %.0f s", what, time.monotonic() - waited)
    try:
        write_json(_holder_path(folder), _holder())
        yield
    finally:
        _holder_path(folder).unlink(missing_ok=True)
        lock.release()


def build_once(folder: str | os.PathLike, build: Callable[[Path], None], *, what: str,
               complete: Optional[Callable[[Path], bool]] = None) -> bool:
    """Make cache entry ``folder`` exist, complete; returns True when this call built it.

    ``build(tmp)`` writes the entry into the folder ``tmp`` (it does not exist yet), which is renamed
    to ``folder`` when ``build`` returns; when it raises, ``tmp`` is removed and the error goes on.
    ``complete(folder)`` (default: the folder exists) says whether an entry can be used; it is
    checked without the lock first, so a built entry costs no waiting, and again under the lock.
    """
    folder = Path(folder)
    complete = complete or Path.is_dir
    if complete(folder):
        return False
    with build_lock(folder, what=what):
        if complete(folder):  # built meanwhile, by the run this one waited for
            return False
        # Under the lock nobody else builds this entry: what is here is left by a build that died
        # (a .tmp folder, or an entry that an older clpd was building in place).
        for leftover in folder.parent.glob(f"{glob.escape(folder.name)}.*.tmp"):
            log.info("%s: removing %s, left by a build that did not finish", what, leftover)
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        if folder.exists():
            log.info("%s: removing %s, an incomplete build", what, folder)
            shutil.rmtree(folder)
        with atomic_path(folder) as tmp:
            build(tmp)
    return True
