"""What varies between runs, seed groups, and paired differences with t-intervals."""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from clpd.report.records import METRICS, _compact, _is_noise

BASELINE = ("method", "standard_kd")  # the default key and value of the groups that the others are compared to
METHOD_KEY, BASELINE_VALUE = BASELINE

# The 0.975 quantile of Student's t for df = 1..30 (scipy is not a dependency; these are
# scipy.stats.t.ppf(0.975, df) to 4 decimals). Beyond 30 the Cornish-Fisher expansion around the
# normal quantile is used, which agrees with the exact value to 1e-5 from df = 31 on.
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
        2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
        2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
Z975 = 1.959964
# The 0.80 quantile for df = 1..30 (scipy.stats.t.ppf(0.8, df)), for the detectable difference.
T80 = (1.3764, 1.0607, 0.9785, 0.9410, 0.9195, 0.9057, 0.8960, 0.8889, 0.8834, 0.8791, 0.8755, 0.8726, 0.8702,
       0.8681, 0.8662, 0.8647, 0.8633, 0.8620, 0.8610, 0.8600, 0.8591, 0.8583, 0.8575, 0.8569, 0.8562, 0.8557,
       0.8551, 0.8546, 0.8542, 0.8538)
Z80 = 0.841621


def _t_quantile(df: int, table: Sequence[float], z: float) -> float:
    if df < 1:
        raise ValueError(f"df={df} must be >= 1")
    if df <= len(table):
        return table[df - 1]
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def t_quantile_975(df: int) -> float:
    """The two-sided 95% critical value of Student's t with ``df`` degrees of freedom."""
    return _t_quantile(df, T975, Z975)


def t_quantile_80(df: int) -> float:
    """The 0.80 quantile of Student's t with ``df`` degrees of freedom."""
    return _t_quantile(df, T80, Z80)


def detectable_difference(sd: float, n: int) -> Optional[float]:
    """The smallest true mean difference that a paired design of ``n`` pairs with this spread of the
    differences detects with 80% power in a two-sided test at 5%: (t_0.975 + t_0.80) * sd / sqrt(n),
    both with n - 1 degrees of freedom (the usual approximation; the exact noncentral-t value is
    about 1% larger at 6 pairs). None with fewer than 2 pairs."""
    if n < 2:
        return None
    return (t_quantile_975(n - 1) + t_quantile_80(n - 1)) * sd / math.sqrt(n)


# ----------------------------------------------------------------------------------------------
# Varied keys, groups, paired differences


def _differs(key: str, runs: Sequence[dict]) -> bool:
    return len({_compact(r["params"].get(key)) for r in runs}) > 1


def _determined_by(key: str, keys: Sequence[str], runs: Sequence[dict]) -> bool:
    """True when runs that agree on ``keys`` always agree on ``key`` (``key`` adds nothing)."""
    seen: Dict[tuple, str] = {}
    for r in runs:
        at = tuple(_compact(r["params"].get(k)) for k in keys)
        value = _compact(r["params"].get(key))
        if seen.setdefault(at, value) != value:
            return False
    return True


def _follows_seed(key: str, runs: Sequence[dict]) -> bool:
    """A key that equals the run's seed wherever both are set (e.g. ``teachers.build.seed: ${seed}``)."""
    pairs = [(r["params"].get(key), r["seed"]) for r in runs if r["seed"] is not None and key in r["params"]]
    return bool(pairs) and all(_compact(v) == _compact(s) for v, s in pairs)


def varied_keys(runs: Sequence[dict]) -> Tuple[List[str], List[str]]:
    """(the keys that tell the groups apart, every key that differs between the runs).

    Candidates in order: the command (train/eval), then the keys of the overrides as the user typed
    them, then Hydra's group choices, then the config. A candidate is kept unless the keys kept
    before it already determine it; ``seed`` and keys that follow the seed never split groups.
    """
    ordered: Dict[str, None] = {"command": None}
    for r in runs:
        ordered.update(dict.fromkeys(r["override_keys"]))
    for r in runs:
        ordered.update(dict.fromkeys(r["choice_keys"]))
    ordered.update(dict.fromkeys(sorted({k for r in runs for k in r["params"]})))
    differing = [k for k in ordered if not _is_noise(k) and _differs(k, runs)]
    kept: List[str] = []
    for key in differing:
        if key == "seed" or _follows_seed(key, runs) or _determined_by(key, kept, runs):
            continue
        kept.append(key)
    return kept, differing


def _stats(values: Sequence[float]) -> dict:
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)) if values else None,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "n": len(values), "values": values}


class SeedBuild(NamedTuple):
    """A run's pairing key where it learned from teachers: its seed and their builds, a tuple of
    (teacher name, short hash of its weights) pairs (clpd.report.records.teacher_build)."""
    seed: Any
    build: tuple


def _seed_and_build(key: Any) -> Tuple[Any, Any]:
    return (key.seed, key.build) if isinstance(key, SeedBuild) else (key, None)


def _same_block(build_a: Any, build_b: Any) -> bool:
    """Two runs are in one block unless a teacher they both used has other weights in each (a
    build is ((teacher name, weights hash), ...), None without teachers)."""
    if not build_a or not build_b:
        return True
    b = dict(build_b)
    return all(b.get(name, weights) == weights for name, weights in build_a)


def paired_values(a: Dict[Any, float], b: Dict[Any, float]) -> List[Tuple[Any, float, float]]:
    """(keys, a's value, b's value) for each pair: keys are seeds (or any other key, matched as it
    is), or :class:`SeedBuild` where a run names the teacher weights it used. Two runs pair when they share the
    seed and no teacher both used has other weights in each: arms are compared within a block."""
    out = []
    for ka, va in a.items():
        seed_a, build_a = _seed_and_build(ka)
        for kb, vb in b.items():
            seed_b, build_b = _seed_and_build(kb)
            if seed_a == seed_b and _same_block(build_a, build_b) and va is not None and vb is not None:
                out.append(((ka, kb), float(va), float(vb)))
    return out


def builds_spanned(pairs: List[Tuple[Any, float, float]]) -> int:
    """How many builds of one teacher the pairs span (the most for any teacher; 0 without teachers)."""
    seen: Dict[str, set] = {}
    for (ka, kb), _, _ in pairs:
        for key in (ka, kb):
            for name, weights in _seed_and_build(key)[1] or ():
                seen.setdefault(name, set()).add(weights)
    return max((len(v) for v in seen.values()), default=0)


def paired_difference(a: Dict[Any, float], b: Dict[Any, float]) -> Tuple[Optional[float], Optional[float], Optional[float], int]:
    """Mean of ``a[s] - b[s]`` over the paired seeds ``s`` (:func:`paired_values`), and its 95% t-interval.

    Returns (mean, low, high, n pairs); the interval is None with fewer than 2 pairs, the mean None
    with none."""
    diffs = np.array([va - vb for _, va, vb in paired_values(a, b)])
    n = len(diffs)
    if n == 0:
        return None, None, None, 0
    mean = float(diffs.mean())
    if n < 2:
        return mean, None, None, 1
    half = t_quantile_975(n - 1) * float(diffs.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def compared(a: Dict[Any, float], b: Dict[Any, float], baseline: str) -> dict:
    """The paired comparison of a group to its baseline: mean, 95% interval, pairs, the difference
    detectable at 80% power from the measured spread (``mde``) and the teacher builds it spans."""
    pairs = paired_values(a, b)
    mean, low, high, n = paired_difference(a, b)
    sd = float(np.std([va - vb for _, va, vb in pairs], ddof=1)) if n > 1 else None
    return {"baseline": baseline, "mean": mean, "low": low, "high": high, "n": n,
            "mde": detectable_difference(sd, n) if sd is not None else None, "builds": builds_spanned(pairs)}


def spelled(value: Any) -> str:
    """A parameter value as ``--baseline KEY=VALUE`` spells it: a string as it is, anything else as
    compact JSON (``null``, ``true``, ``8``, ``0.005``), as a Hydra override would write it."""
    return value if isinstance(value, str) else _compact(value)


def _display(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return _ladder_names(value) or str(value)


def _ladder_names(value: Any) -> Optional[str]:
    """A teacher ladder (model specs, kept as one compact JSON value) shown by its rungs' names,
    "[s, m, l, xl]": the specs are hundreds of characters. Display only: groups keep the whole value."""
    if not (isinstance(value, str) and value.startswith("[{")):
        return None
    try:
        specs = json.loads(value)
    except ValueError:
        return None
    if all(isinstance(spec, dict) and "name" in spec for spec in specs):
        return "[" + ", ".join(str(spec["name"]) for spec in specs) + "]"
    return None


def by_seed(runs: Sequence[dict], metric: str = "accuracy_strict") -> Dict[Any, float]:
    """``metric`` per seed of the completed runs (a seed run twice counts once, averaged); keyed by
    (seed, build) where the run records the teacher weights it used (see :func:`paired_values`)."""
    values: Dict[Any, List[float]] = {}
    for r in runs:
        value = r["metrics"][metric]
        if r["status"] == "completed" and value is not None and r["seed"] is not None:
            key = SeedBuild(r["seed"], r["build"]) if r.get("build") else r["seed"]
            values.setdefault(key, []).append(value)
    return {s: float(np.mean(v)) for s, v in values.items()}


def group_runs(runs: Sequence[dict], baseline: Tuple[str, str] = BASELINE) -> List[dict]:
    """Runs that differ only by seed, as groups with their statistics, in order of first appearance.

    Each group: ``params`` (its values of the varied keys), ``label``, ``runs``, the counts
    ``completed``, ``failed`` and ``unfinished``, one ``_stats`` dict (mean, std, n, values) per
    metric of ``METRICS`` over the completed runs, ``accuracy_by_seed``, ``curve_by_seed``,
    ``is_baseline``, and ``vs_baseline``: the paired difference of strict accuracy to the group's
    baseline (None for a baseline group itself, and where there is none); ``vs_baseline_curve`` the
    same for the learning-curve mean (``curve_accuracy``).

    ``baseline`` is (KEY, VALUE), by default ``method=standard_kd``. The baseline groups are those
    whose KEY is spelled VALUE (:func:`spelled`); there are none unless KEY is one of the varied keys
    that tell the groups apart. Each other group's baseline is the one baseline group that agrees with
    it on every other varied key, skipping the keys on which no baseline group has the group's value:
    with KEY=``distill.teacher_outputs``, VALUE=``live``, a stored group with ``distill.top_k=8``
    is compared to the live group of its ``method`` (the live groups all have the default top_k, so
    top_k is skipped; ``method`` is not, since a live group of that method exists). If no baseline
    group, or more than one, agrees on the keys that are left, the group has no baseline. With a
    single baseline group, every other group is compared to it.
    """
    key, value = baseline
    kept, _ = varied_keys(runs)
    groups: Dict[tuple, dict] = {}
    for r in runs:
        at = tuple(_compact(r["params"].get(k)) for k in kept)
        if at not in groups:
            params = {k: r["params"].get(k) for k in kept}
            label = " / ".join(_display(v) for v in params.values()) if kept else "all runs"  # e.g. "arith / clpd"
            groups[at] = {"params": params, "label": label, "runs": []}
        groups[at]["runs"].append(r)
        r["group"] = groups[at]["label"]

    out = list(groups.values())
    for g in out:
        done = [r for r in g["runs"] if r["status"] == "completed"]
        g["completed"] = len(done)
        g["failed"] = sum(r["status"] in ("failed", "unreadable") for r in g["runs"])
        g["unfinished"] = sum(r["status"] in ("unfinished", "interrupted") for r in g["runs"])
        for m in METRICS:
            g[m] = _stats([r["metrics"][m] for r in done if r["metrics"][m] is not None])
        g["accuracy_by_seed"] = by_seed(g["runs"])
        g["curve_by_seed"] = by_seed(g["runs"], "curve_accuracy")
        g["vs_baseline"] = g["vs_baseline_curve"] = None
        g["is_baseline"] = key in kept and spelled(g["params"][key]) == value

    baselines = [g for g in out if g["is_baseline"]]
    others = [k for k in kept if k != key]
    for g in out:
        if g["is_baseline"] or not baselines:
            continue
        at = {k: _compact(g["params"][k]) for k in others}
        # The keys on which some baseline group has this group's value must agree; the others are skipped.
        keys = [k for k in others if any(_compact(b["params"][k]) == at[k] for b in baselines)]
        same = [b for b in baselines if all(_compact(b["params"][k]) == at[k] for k in keys)]
        if len(same) == 1:
            base = same[0]
            for name, key in (("vs_baseline", "accuracy_by_seed"), ("vs_baseline_curve", "curve_by_seed")):
                g[name] = compared(g[key], base[key], base["label"])
    return out
