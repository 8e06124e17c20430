"""Difficulty scorers, their fusion, and the easy-to-hard order of the training set.

Every scorer returns a numpy float array with one score per problem, in the problems' order;
HIGHER means HARDER. Scores that need a model (:func:`per_example_loss`) are worth caching
(:func:`save_scores` / :func:`load_scores`); the others are cheap to recompute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from clpd.data.batching import collate
from clpd.data.prompts import IGNORE_INDEX
from clpd.data.records import Problem

ORDERS = ("easy_to_hard", "hard_to_easy", "random")


# --- scorers -----------------------------------------------------------------------------------

def cot_steps(problems: Sequence[Problem]) -> np.ndarray:
    """The number of reasoning steps of each problem's solution (``Problem.num_steps``)."""
    return np.array([p.num_steps for p in problems], dtype=np.float64)


def cot_length(examples: Sequence[Dict[str, Any]]) -> np.ndarray:
    """The number of answer tokens of each encoded example: its labels that are not -100 (the
    solution and the eos, after any truncation)."""
    return np.array([sum(1 for t in e["labels"] if t != IGNORE_INDEX) for e in examples], dtype=np.float64)


def random_scores(n: int, seed: int) -> np.ndarray:
    """The control: ``n`` scores uniform in [0, 1), the same for the same seed."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    return np.random.default_rng(seed).random(n)


def per_example_loss(model: torch.nn.Module, examples: Sequence[Dict[str, Any]], *, batch_size: int,
                     device: torch.device | str, pad_id: int) -> np.ndarray:
    """The mean cross-entropy of each example's answer tokens under ``model`` (a transformers
    causal LM already on ``device``): the ``student_loss`` scorer with the initial student, the
    ``teacher_loss`` scorer with a teacher.

    One pass over the examples in batches of ``batch_size``, longest first (similar lengths share
    a batch, so little padding; an out-of-memory error shows on the first batch), right-padded
    with an attention mask, in eval mode under ``torch.inference_mode()``. The model's train/eval
    mode is restored afterwards. The logits are upcast to fp32 one row at a time, so the fp32
    temporary is ``[length, vocab]``, not ``[batch, length, vocab]``. An example with no answer
    token (a prompt cut by ``max_len``) scores 0.0: it contributes no loss to training either.
    Returned in the order of ``examples``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    n = len(examples)
    losses = np.zeros(n, dtype=np.float64)
    by_length = sorted(range(n), key=lambda i: -len(examples[i]["input_ids"]))  # stable: ties keep input order
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                rows = by_length[start:start + batch_size]
                batch = collate([examples[i] for i in rows], pad_id)  # the training loop's batching
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
                targets = batch["targets"].to(device)  # position j predicts token j + 1
                for r, i in enumerate(rows):
                    answer = targets[r] != IGNORE_INDEX
                    count = int(answer.sum())
                    if count:
                        ce = F.cross_entropy(logits[r][answer].float(), targets[r][answer], reduction="sum")
                        losses[i] = ce.item() / count
                del logits
    finally:
        model.train(was_training)
    return losses


def _average_ranks(scores: np.ndarray) -> np.ndarray:
    """Ranks 1..n in ascending score; tied scores share the average of the ranks they span
    (``scipy.stats.rankdata(method="average")``)."""
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))  # 0-based position of each value's first rank
    return (first + (counts + 1) / 2.0)[inverse]


def rrf(score_arrays: Sequence[np.ndarray], k: float = 60.0) -> np.ndarray:
    """Reciprocal rank fusion (Cormack, Clarke & Buettcher 2009, SIGIR), as POCL fuses difficulty
    scorers: each scorer ranks the examples from easy (rank 1) to hard, the fused *easiness* of an
    example is ``sum over scorers of 1 / (k + rank)``, and the returned difficulty is its negative
    (higher = harder, like every scorer here).

    Ties within a scorer share the average of the ranks they span (fractional ranking): examples
    a scorer cannot tell apart get the same rank, and the scorer's ranks still sum to
    n (n + 1) / 2, so a coarse scorer (``cot_steps`` has a handful of values) does not pull its
    examples towards "easy" as the minimum rank would.
    """
    if len(score_arrays) == 0:
        raise ValueError("rrf needs at least one score array")
    if not k >= 0:
        raise ValueError(f"k={k} must be >= 0")
    arrays = [np.asarray(a, dtype=np.float64) for a in score_arrays]
    n = len(arrays[0])
    for j, a in enumerate(arrays):
        if a.ndim != 1 or len(a) != n:
            raise ValueError(f"score array {j} has shape {a.shape}; all must be 1-D of length {n}")
        if np.isnan(a).any():
            raise ValueError(f"score array {j} holds NaN at positions {np.flatnonzero(np.isnan(a))[:10].tolist()}")
    easiness = sum(1.0 / (k + _average_ranks(a)) for a in arrays)
    return -np.asarray(easiness, dtype=np.float64)


# --- order ---------------------------------------------------------------------------------------

def order_indices(scores: Sequence[float], order: Any, seed: int) -> List[int]:
    """The example indices in training order.

    ``easy_to_hard``: ascending difficulty; ``hard_to_easy``: descending; ``random``: a seeded
    permutation that ignores the scores. Ties are broken by a random key drawn from ``seed``
    (``np.lexsort`` by (key, score)), so the same seed gives the same order and another seed may
    order tied examples differently; a curriculum over a coarse scorer is not ordered by index.
    """
    key = getattr(order, "value", order)  # the config's str Enum or a plain string
    if key not in ORDERS:
        raise ValueError(f"unknown order {key!r}; allowed: {', '.join(ORDERS)}")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    rng = np.random.default_rng(seed)
    if key == "random":
        return rng.permutation(len(s)).tolist()
    if np.isnan(s).any():
        raise ValueError(f"scores hold NaN at positions {np.flatnonzero(np.isnan(s))[:10].tolist()}")
    tie_break = rng.random(len(s))
    primary = s if key == "easy_to_hard" else -s
    return np.lexsort((tie_break, primary)).tolist()  # the last key is the primary one


def difficulty_range(scores: Sequence[float], ordered_indices: Sequence[int], pool: int) -> Tuple[float, float]:
    """(min, max) difficulty of the first ``pool`` examples of the order, for the log."""
    if pool < 1:
        raise ValueError(f"pool={pool} must be >= 1")
    head = np.asarray(scores, dtype=np.float64)[np.asarray(ordered_indices[:pool], dtype=np.int64)]
    if head.size == 0:
        raise ValueError("ordered_indices is empty")
    return float(head.min()), float(head.max())


# --- cache -----------------------------------------------------------------------------------------

def fingerprint(items: Sequence[Any]) -> str:
    """A short hash of problems (dataclasses) or encoded examples (dicts of lists), for the
    ``data`` entry of a cache's meta: different data or tokenization, different fingerprint."""
    h = hashlib.sha256()
    for item in items:
        obj = dataclasses.asdict(item) if dataclasses.is_dataclass(item) else item
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _jsonable(meta: Dict[str, Any]) -> Any:
    # What the meta reads back as (tuples become lists, Enums their values): compared on load.
    return json.loads(json.dumps(meta, sort_keys=True, default=lambda o: getattr(o, "value", str(o))))


def save_scores(path: str | os.PathLike, scores: np.ndarray, meta: Dict[str, Any]) -> None:
    """Write ``{"meta": meta, "scores": [...]}`` as JSON, atomically (a temporary file in the same
    folder, then ``os.replace``), so a crash leaves the old file or the new one, never half of one.

    ``meta`` says what the scores were computed from, e.g. ``{"scorer": "student_loss", "model":
    "...", "data": fingerprint(examples), "num_examples": n}``; :func:`load_scores` returns them
    only for the same meta. Floats round-trip exactly (JSON floats are ``repr``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": _jsonable(meta), "scores": [float(x) for x in np.asarray(scores, dtype=np.float64).ravel()]}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    if payload.get("meta") != _jsonable(meta):
        return None
    scores = np.asarray(payload["scores"], dtype=np.float64)
    expected = payload["meta"].get("num_examples") if isinstance(payload["meta"], dict) else None
    if expected is not None and expected != len(scores):
        return None
    return scores
