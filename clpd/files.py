"""Writing files so that nothing is ever half-written, and plain data for JSON and hashing.

Every file clpd writes goes through :func:`atomic_path`: the content is written beside the target
and renamed onto it, so a crash, a full disk or Ctrl-C leaves the old file or the new one, never a
part of one, and a reader never sees a file while it is being written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write into; renamed onto ``path`` when the block ends.

    The temporary path does not exist yet: the block creates a file or a whole folder there. When
    the block succeeds it is ``os.replace``d onto ``path`` (a file replaces an existing file; a
    folder needs ``path`` not to exist, or to be an empty folder). When the block raises (any
    exception, Ctrl-C included) whatever it created there is removed and the exception goes on.

    The name is ``<name>.<pid>-<random>.tmp``, unique per call rather than a fixed ``<name>.tmp``:
    two processes writing the same file (two jobs of a sweep, a report run twice) then write two
    temporary files, and each rename moves a whole one into place (the last wins), where with one
    shared name one writer could rename the other's half-written file, or remove it under it. It
    still ends in ``.tmp`` and sits in the same folder (``os.replace`` within one file system is
    atomic), so leftovers of a killed process are easy to find (``prune_checkpoints``).
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, flushed to the disk before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented JSON with a trailing newline, atomically. NaN and infinities raise
    ``ValueError`` (they are not JSON: other readers would refuse the file)."""
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    """One JSON object a line, atomically."""
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def _encode(obj: Any) -> Any:
    # What json cannot encode by itself: a dataclass as its fields, an Enum (or anything else with a
    # ``value``) by its value, the rest as its str.
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return getattr(obj, "value", str(obj))


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_encode)


def plain_json(obj: Any) -> Any:
    """``obj`` (a dataclass, a dict, a list, ...) as the plain data JSON reads back: dataclasses
    as dicts of their fields, Enums by their values, tuples as lists, dict keys sorted.

    What is hashed for cache keys (teachers' folders) and compared for cached scores, so its
    output must not change: a change renames every cached teacher.
    """
    return json.loads(_dumps(obj))


def digest(data: Any, length: int = 12) -> str:
    """A short hash of plain data (dict keys sorted): the cache keys of teachers, their evaluation
    folders and stored outputs. Its output must not change: a change renames every cache entry."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:length]


def fingerprint(items: Sequence[Any]) -> str:
    """A short hash of problems (dataclasses) or encoded examples (dicts of lists), for the
    ``data`` entry of a score cache's meta and of a checkpoint's manifest: different data or
    tokenization, different fingerprint."""
    h = hashlib.sha256()
    for item in items:
        h.update(_dumps(item).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]
