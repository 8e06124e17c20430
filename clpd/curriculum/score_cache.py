"""The cache of a run's difficulty scores (``difficulty.json`` in the run dir): scores that need a
model take a pass over the training set, so a resumed or repeated run reads them back, but only
when they were computed from the same scorer, model and data (the cache's ``meta``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from clpd.files import plain_json, write_text


def save_scores(path: str | os.PathLike, scores: np.ndarray, meta: Dict[str, Any]) -> None:
    """Write ``{"meta": meta, "scores": [...]}`` as JSON, atomically (:func:`clpd.files.write_text`),
    so a crash leaves the old file or the new one, never half of one.

    ``meta`` says what the scores were computed from, e.g. ``{"scorer": "student_loss", "model":
    "...", "data": clpd.files.fingerprint(examples), "num_examples": n}``; :func:`load_scores`
    returns them only for the same meta. Floats round-trip exactly (JSON floats are ``repr``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": plain_json(meta), "scores": [float(x) for x in np.asarray(scores, dtype=np.float64).ravel()]}
    write_text(path, json.dumps(payload))


def load_scores(path: str | os.PathLike, meta: Dict[str, Any]) -> Optional[np.ndarray]:
    """The cached scores at ``path`` if they were saved with the same ``meta``; else None (no
    file, an unreadable file, another meta, or a ``num_examples`` that the scores do not match),
    so a changed config recomputes instead of reusing stale scores."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("scores"), list):
        return None
    if payload.get("meta") != plain_json(meta):
        return None
    scores = np.asarray(payload["scores"], dtype=np.float64)
    expected = payload["meta"].get("num_examples") if isinstance(payload["meta"], dict) else None
    if expected is not None and expected != len(scores):
        return None
    return scores
