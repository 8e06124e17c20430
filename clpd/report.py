"""``clpd report PATH... [--out DIR]``: tables and plots over run dirs.

PATH is a run dir, a sweep dir, or any folder above them: every dir holding ``.hydra/config.yaml``
and ``.hydra/overrides.yaml`` is a run (teacher caches have no ``.hydra`` and are not). Each run
becomes a row, failed and unfinished ones included. Runs whose configs differ only by ``seed`` form a
group (mean ± sample std over the completed seeds); when the groups differ by ``method`` and one of
them is ``standard_kd``, every other group gets the paired difference of strict accuracy to it over
the seeds both completed, with a 95% t-interval. Written into ``--out`` (default: the single PATH, or
the current directory): ``report.md``, ``report.csv`` (one row per run) and ``report.png``.

Which columns a table shows: the config keys that differ between the runs, minus the ones that a
key shown before them already explains. Keys are considered in the order the user chose them (the
command-line overrides, e.g. ``method``), then Hydra's group choices, then the composed config; so a
sweep over ``method`` shows ``method`` and not the ``distill.loss``/``curriculum.*`` values that each
method preset sets.

This is a plain argparse command, not a Hydra app: it reads runs, it does not make one.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from clpd.errors import ClpdError

METRICS = ("accuracy_strict", "accuracy_flexible", "n", "tokens_seen", "train_time_s", "final_loss")
EXTRA_METRICS = ("steps", "answer_tokens_seen", "wall_time_s", "student_parameters")
BASELINE = ("method", "standard_kd")  # the key and value of the group that the others are compared to
METHOD_KEY, BASELINE_VALUE = BASELINE

# The 0.975 quantile of Student's t for df = 1..30 (scipy is not a dependency; these are
# scipy.stats.t.ppf(0.975, df) to 4 decimals). Beyond 30 the Cornish-Fisher expansion around the
# normal quantile is used, which agrees with the exact value to 1e-5 from df = 31 on.
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
        2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
        2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """The two-sided 95% critical value of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"df={df} must be >= 1")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


# ----------------------------------------------------------------------------------------------
# Reading runs


def _is_noise(key: str) -> bool:
    """Keys that differ between runs without making them different experiments: Hydra's own
    settings and filesystem locations (caches, data dirs). ``student.path`` (which student) and
    eval's ``checkpoint`` (which model was evaluated) are what a run is about, so they stay."""
    if key == "student.path":
        return False
    last = key.rsplit(".", 1)[-1]
    return key.split(".")[0].split("/")[0] == "hydra" or last.endswith("dir") or last == "path"


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    """A nested config as dotted keys; lists (a teacher ladder) as one compact JSON value."""
    if isinstance(node, dict) and (node or not prefix):
        out: Dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: _compact(node) if isinstance(node, (list, dict)) else node}


def _load_config(path: Path) -> dict:
    cfg = OmegaConf.load(path)
    try:  # interpolations such as ${seed} resolve; resolvers of Hydra's runtime (${now:...}) do not
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return OmegaConf.to_container(cfg, resolve=False)


def _parse_override(text: str) -> Optional[Tuple[str, str]]:
    """``method=clpd`` -> ("method", "clpd"); ``+experiment=arith`` -> ("experiment", "arith");
    ``~key`` -> ("key", "<deleted>")."""
    text = str(text).strip()
    if text.startswith("~"):
        key, _, value = text[1:].partition("=")
        return key, "<deleted>"
    key, sep, value = text.lstrip("+").partition("=")
    return (key, value) if sep else None


def _read_json(path: Path) -> Optional[Any]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path.name} is unreadable: {exc}") from None


def _loss_curve(path: Path) -> List[Tuple[int, float]]:
    """(step, loss) of the logging lines; event lines and a half-written last line are skipped."""
    curve: List[Tuple[int, float]] = []
    if not path.is_file():
        return curve
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "loss" in record and "step" in record and record["loss"] is not None:
            curve.append((int(record["step"]), float(record["loss"])))
    return curve


def _natural_key(path: Path) -> list:
    """Sweep job dirs 0, 1, ..., 10 in numeric order; dated run dirs in time order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_run_dirs(root: Path) -> List[Path]:
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if (here / ".hydra" / "config.yaml").is_file() and (here / ".hydra" / "overrides.yaml").is_file():
            found.append(here)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "checkpoints"]
    return found


def read_run(run_dir: Path) -> dict:
    """One run dir as a row: its parameters (config, group choices, overrides), status and metrics."""
    hydra_dir = run_dir / ".hydra"
    run: Dict[str, Any] = {"run": str(run_dir), "command": None, "status": "unfinished", "error": None,
                           "params": {}, "override_keys": [], "choice_keys": [], "seed": None,
                           "metrics": {m: None for m in METRICS + EXTRA_METRICS}, "by_difficulty": {}, "curve": []}
    try:
        config = _load_config(hydra_dir / "config.yaml") or {}
        overrides = OmegaConf.to_container(OmegaConf.load(hydra_dir / "overrides.yaml")) or []
        choices, job_name = {}, None
        if (hydra_dir / "hydra.yaml").is_file():
            hydra_cfg = OmegaConf.load(hydra_dir / "hydra.yaml")
            choices = OmegaConf.to_container(OmegaConf.select(hydra_cfg, "hydra.runtime.choices") or {})
            job_name = OmegaConf.select(hydra_cfg, "hydra.job.name", default=None)
        run["command"] = job_name or ("eval" if "checkpoint" in config and "trainer" not in config else "train")

        flat = flatten(config)
        params = {"command": run["command"], **flat}
        for group, option in choices.items():  # Hydra's group choices, e.g. method: clpd (not in the config)
            if group not in params and not group.startswith("hydra/"):
                params[group] = option
                run["choice_keys"].append(group)
        for text in overrides:  # what the user typed wins over the defaults, for keys the config lacks
            parsed = _parse_override(text)
            if parsed is None:
                continue
            key, value = parsed
            run["override_keys"].append(key)
            if key not in flat:
                params[key] = value
        run["params"] = {k: v for k, v in params.items() if not _is_noise(k)}
        run["seed"] = params.get("seed")

        status = _read_json(run_dir / "status.json") or {}
        if status.get("status") in ("completed", "failed"):
            run["status"] = status["status"]
        run["error"] = status.get("error")

        summary = _read_json(run_dir / "summary.json") or {}
        metrics = summary.get("eval") or _read_json(run_dir / "eval" / "metrics.json")
        if metrics is None and run["command"] == "eval":
            metrics = _read_json(run_dir / "metrics.json")
        metrics = metrics or {}
        for key in METRICS + EXTRA_METRICS:
            value = metrics.get(key, summary.get(key))
            run["metrics"][key] = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        run["by_difficulty"] = {int(k): v for k, v in (metrics.get("by_difficulty") or {}).items()
                                if str(k).lstrip("-").isdigit()}
        run["curve"] = _loss_curve(run_dir / "metrics.jsonl")
    except Exception as exc:  # one broken run dir is a row that says so, not the end of the report
        run["status"], run["error"] = "unreadable", f"{type(exc).__name__}: {exc}"
    if run["status"] != "completed":  # metrics of a run that did not finish are not its results
        run["metrics"] = {m: None for m in run["metrics"]}
        run["by_difficulty"] = {}
    return run


def collect_runs(paths: Iterable[Any]) -> List[dict]:
    """Every run under ``paths`` (run dirs, sweep dirs, folders above them), in path order."""
    dirs: Dict[Path, None] = {}
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise ClpdError(f"{path} does not exist")
        if not path.is_dir():
            raise ClpdError(f"{path} is not a directory (give a run dir, a sweep dir or a folder above them)")
        for d in find_run_dirs(path):
            dirs.setdefault(d.resolve(), None)
    return [read_run(d) for d in sorted(dirs, key=_natural_key)]


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


def paired_difference(a: Dict[Any, float], b: Dict[Any, float]) -> Tuple[Optional[float], Optional[float], Optional[float], int]:
    """Mean of ``a[s] - b[s]`` over the seeds ``s`` in both, and its 95% t-interval.

    Returns (mean, low, high, n pairs); the interval is None with fewer than 2 pairs, the mean None
    with none."""
    seeds = [s for s in a if s in b and a[s] is not None and b[s] is not None]
    diffs = np.array([float(a[s]) - float(b[s]) for s in seeds])
    n = len(diffs)
    if n == 0:
        return None, None, None, 0
    mean = float(diffs.mean())
    if n < 2:
        return mean, None, None, 1
    half = t_quantile_975(n - 1) * float(diffs.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half, n


def _display(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _accuracy_by_seed(runs: Sequence[dict]) -> Dict[Any, float]:
    """Strict accuracy per seed of the completed runs (a seed run twice counts once, averaged)."""
    by_seed: Dict[Any, List[float]] = {}
    for r in runs:
        acc = r["metrics"]["accuracy_strict"]
        if r["status"] == "completed" and acc is not None and r["seed"] is not None:
            by_seed.setdefault(r["seed"], []).append(acc)
    return {s: float(np.mean(v)) for s, v in by_seed.items()}


def group_runs(runs: Sequence[dict]) -> List[dict]:
    """Runs that differ only by seed, as groups with their statistics, in order of first appearance.

    Each group: ``params`` (its values of the varied keys), ``label``, ``runs``, the counts
    ``completed``, ``failed`` and ``unfinished``, one ``_stats`` dict (mean, std, n, values) per
    metric of ``METRICS`` over the completed runs, ``accuracy_by_seed``, and
    ``vs_baseline``: the paired difference of strict accuracy to the ``method=standard_kd`` group
    (None for that group itself, and where there is none).
    """
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
        g["unfinished"] = sum(r["status"] == "unfinished" for r in g["runs"])
        for m in METRICS:
            g[m] = _stats([r["metrics"][m] for r in done if r["metrics"][m] is not None])
        g["accuracy_by_seed"] = _accuracy_by_seed(g["runs"])
        g["vs_baseline"] = None
        g["is_baseline"] = METHOD_KEY in kept and g["params"].get(METHOD_KEY) == BASELINE_VALUE

    baselines = [g for g in out if g["is_baseline"]]
    for g in out:
        if g["is_baseline"] or not baselines:
            continue
        # The standard_kd group that agrees on every other varied key; else the only one there is.
        same = [b for b in baselines if all(_compact(b["params"][k]) == _compact(g["params"][k])
                                            for k in kept if k != METHOD_KEY)]
        base = same[0] if len(same) == 1 else baselines[0] if len(baselines) == 1 else None
        if base is not None:
            mean, low, high, n = paired_difference(g["accuracy_by_seed"], base["accuracy_by_seed"])
            g["vs_baseline"] = {"baseline": base["label"], "mean": mean, "low": low, "high": high, "n": n}
    return out


# ----------------------------------------------------------------------------------------------
# Formatting


def _fmt_number(x: Optional[float], kind: str) -> str:
    if x is None:
        return "-"
    if kind == "acc":
        return f"{x:.3f}"
    if kind == "tokens":
        for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(x) >= size:
                return f"{x / size:.2f}{unit}"
        return f"{x:.0f}"
    if kind == "time":
        return f"{x:.0f} s" if abs(x) >= 10 else f"{x:.1f} s"
    if kind == "loss":
        return f"{x:.4f}"
    return _display(x)


def _fmt_stats(s: dict, kind: str) -> str:
    if s["mean"] is None:
        return "-"
    if s["std"] is None:
        return _fmt_number(s["mean"], kind)
    mean, std = s["mean"], s["std"]
    if kind == "time":  # "123 ± 4 s", "12.0 ± 2.0 s"
        digits = 0 if abs(mean) >= 100 else 1
        return f"{mean:.{digits}f} ± {std:.{digits}f} s"
    if kind == "tokens":  # the std in the mean's unit: "1.10M ± 0.01M"
        unit, size = next(((u, z) for u, z in (("G", 1e9), ("M", 1e6), ("k", 1e3)) if abs(mean) >= z), ("", 1))
        return f"{mean / size:.2f}{unit} ± {std / size:.2f}{unit}" if unit else f"{mean:.0f} ± {std:.0f}"
    return f"{_fmt_number(mean, kind)} ± {_fmt_number(std, kind)}"


def _fmt_delta(g: dict) -> str:
    d = g["vs_baseline"]
    if g["is_baseline"]:
        return "baseline"
    if d is None:
        return "-"
    if d["n"] == 0:
        return "no paired seeds"
    if d["low"] is None:
        return f"{d['mean']:+.3f} (1 pair, no CI)"
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] ({d['n']} pairs)"


def _fmt_n(g: dict) -> str:
    extra = [f"+{g['failed']} failed"] * bool(g["failed"]) + [f"+{g['unfinished']} unfinished"] * bool(g["unfinished"])
    return f"{g['completed']}" + (f" ({', '.join(extra)})" if extra else "")


def group_table_rows(groups: Sequence[dict], kept: Sequence[str]) -> Tuple[List[str], List[List[str]]]:
    header = [*kept] if kept else ["runs"]
    header += ["acc strict", "acc flexible", f"Δ strict vs {BASELINE_VALUE} [95% CI]", "tokens seen", "train time", "n"]
    rows = []
    for g in groups:
        rows.append([*(_display(g["params"][k]) for k in kept)] if kept else [g["label"]])
        rows[-1] += [_fmt_stats(g["accuracy_strict"], "acc"), _fmt_stats(g["accuracy_flexible"], "acc"),
                     _fmt_delta(g), _fmt_stats(g["tokens_seen"], "tokens"), _fmt_stats(g["train_time_s"], "time"),
                     _fmt_n(g)]
    if not any(g["is_baseline"] for g in groups):  # no comparison to show
        i = header.index(f"Δ strict vs {BASELINE_VALUE} [95% CI]")
        header.pop(i)
        for row in rows:
            row.pop(i)
    return header, rows


def _one_line(text: Optional[str], limit: int = 300) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _rel(path: str, out_dir: Path) -> str:
    try:
        return os.path.relpath(path, out_dir.resolve())
    except ValueError:
        return path


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _csv_columns(runs: Sequence[dict], kept: Sequence[str], differing: Sequence[str]) -> List[str]:
    difficulties = sorted({d for r in runs for d in r["by_difficulty"]})
    columns = ["run", "status", "error", "group", *kept, "seed", *METRICS, *EXTRA_METRICS]
    columns += [f"accuracy_strict_steps_{d}" for d in difficulties]
    columns += [k for k in differing if k not in columns]
    return columns


def _csv_value(run: dict, column: str) -> Any:
    if column in ("run", "status", "error", "group", "seed"):
        value = run.get(column)
    elif column in run["metrics"]:
        value = run["metrics"][column]
    elif column.startswith("accuracy_strict_steps_"):
        value = (run["by_difficulty"].get(int(column.rsplit("_", 1)[1])) or {}).get("accuracy_strict")
    else:
        value = run["params"].get(column)
    return "" if value is None else value


# ----------------------------------------------------------------------------------------------
# The figure


def _wrap(label: str, width: int) -> str:
    """A tick label in lines of about ``width`` characters, broken after ``_``, ``,``, ``/`` or a space."""
    lines, line = [], ""
    for piece in re.split(r"(?<=[_, /])", label):
        if line and len(line) + len(piece) > width:
            lines.append(line.rstrip())
            line = ""
        line += piece
    return "\n".join(lines + [line.rstrip()])


def plot_report(runs: Sequence[dict], groups: Sequence[dict], kept: Sequence[str], path: Path) -> None:
    """Three panels: (a) accuracy per group with the seeds as dots, (b) accuracy by difficulty,
    (c) training loss curves. Written atomically."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    colors = [f"C{i % 10}" for i in range(len(groups))]
    fig = Figure(figsize=(18, 5.6), layout="constrained")
    ax_acc, ax_diff, ax_loss = fig.subplots(1, 3)
    n_failed = sum(r["status"] in ("failed", "unreadable") for r in runs)
    n_unfinished = sum(r["status"] == "unfinished" for r in runs)
    fig.suptitle(f"clpd report: {len(runs)} runs in {len(groups)} group{'s' * (len(groups) != 1)}"
                 f" ({n_failed} failed, {n_unfinished} unfinished); varied: {', '.join(kept) or 'nothing but seed'}",
                 fontsize=13)

    # (a) accuracy per group
    x = np.arange(len(groups))
    rng = np.random.default_rng(0)  # jitter of the seed dots, fixed so the figure is reproducible
    top = 0.0
    for i, g in enumerate(groups):
        s = g["accuracy_strict"]
        if s["mean"] is None:
            ax_acc.text(i, 0.5, "no test\naccuracy" if g["completed"] else "no completed\nruns", ha="center",
                        va="center", fontsize=9, color="0.4", transform=ax_acc.get_xaxis_transform())
            continue
        ax_acc.bar(i, s["mean"], color=colors[i], alpha=0.6, width=0.6,
                   yerr=s["std"] if s["std"] is not None else None, capsize=6, ecolor="black")
        ax_acc.scatter(i + rng.uniform(-0.12, 0.12, len(s["values"])), s["values"], color="black", s=18, zorder=3,
                       label="one seed" if i == 0 else None)
        top = max(top, s["mean"] + (s["std"] or 0), *s["values"])
    for i, g in enumerate(groups):  # how many seeds each bar stands for, at its foot
        extra = [f"+{g[k]} {k}" for k in ("failed", "unfinished") if g[k]]
        ax_acc.text(i, 0.005, "\n".join([f"n={g['completed']}", *extra]), ha="center", va="bottom", fontsize=8,
                    color="0.15")
    ax_acc.set_xticks(x, [_wrap(g["label"], max(6, 60 // max(len(groups), 1))) for g in groups], fontsize=9)
    ax_acc.set_xlim(-0.6, len(groups) - 0.4)
    ax_acc.set_ylim(0, min(1.0, max(0.1, top * 1.15 + 0.02)) if top > 0 else 1.0)
    ax_acc.set_xlabel(" / ".join(kept) or "group")
    ax_acc.set_ylabel("strict accuracy (fraction correct)")
    ax_acc.set_title("(a) final test accuracy (bar: mean, whisker: ± std, dot: seed)")
    ax_acc.grid(axis="y", alpha=0.3)
    if any(g["accuracy_strict"]["values"] for g in groups):
        ax_acc.legend(loc="upper left", fontsize=8)

    # (b) accuracy by difficulty
    drawn = False
    for i, g in enumerate(groups):
        done = [r for r in g["runs"] if r["status"] == "completed" and r["by_difficulty"]]
        steps = sorted({d for r in done for d in r["by_difficulty"]})
        if not steps:
            continue
        per = [[r["by_difficulty"][d]["accuracy_strict"] for r in done
                if d in r["by_difficulty"] and r["by_difficulty"][d].get("accuracy_strict") is not None] for d in steps]
        mean = np.array([np.mean(v) if v else np.nan for v in per])
        std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in per])
        ax_diff.plot(steps, mean, marker="o", color=colors[i], label=f"{g['label']} (n={len(done)})")
        ax_diff.fill_between(steps, mean - std, mean + std, color=colors[i], alpha=0.15, linewidth=0)
        drawn = True
    if drawn:
        ax_diff.legend(fontsize=8)
        ax_diff.xaxis.get_major_locator().set_params(integer=True)
        ax_diff.set_ylim(0, 1.02)
    else:
        ax_diff.text(0.5, 0.5, "no per-difficulty metrics", ha="center", va="center", transform=ax_diff.transAxes,
                     color="0.4")
    ax_diff.set_xlabel("reasoning steps (difficulty)")
    ax_diff.set_ylabel("strict accuracy (fraction correct)")
    ax_diff.set_title("(b) accuracy by difficulty: mean over seeds (band: ± std)")
    ax_diff.grid(alpha=0.3)

    # (c) training loss
    drawn = False
    for i, g in enumerate(groups):
        curves = {id(r): dict((s, l) for s, l in r["curve"] if l > 0) for r in g["runs"] if r["curve"]}
        for r in g["runs"]:
            c = curves.get(id(r))
            if c:
                ax_loss.plot(list(c), list(c.values()), color=colors[i], alpha=0.25, linewidth=0.8,
                             linestyle="-" if r["status"] == "completed" else ":")
        done = [curves[id(r)] for r in g["runs"] if r["status"] == "completed" and curves.get(id(r))]
        if not done:
            continue
        steps = sorted({s for c in done for s in c})
        mean = [np.mean([c[s] for c in done if s in c]) for s in steps]
        ax_loss.plot(steps, mean, color=colors[i], linewidth=2, label=f"{g['label']} (mean of {len(done)})")
        drawn = True
    if drawn:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        # Plain numbers (0.5, 2) on the log axis, not 5×10^-1; the 2s, 3s and 5s between the powers of
        # ten are labelled too when the curves span less than two decades.
        ax_loss.set_yscale("log")
        ax_loss.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        low, high = ax_loss.get_ylim()
        if math.log10(high / low) < 2:
            ax_loss.yaxis.set_minor_formatter(FuncFormatter(
                lambda y, _: f"{y:g}" if round(y / 10 ** math.floor(math.log10(y)), 6) in (2, 3, 5) else ""))
        else:
            ax_loss.yaxis.set_minor_formatter(NullFormatter())
        ax_loss.legend(fontsize=8)
    else:
        ax_loss.text(0.5, 0.5, "no training curves", ha="center", va="center", transform=ax_loss.transAxes, color="0.4")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss per answer token (log scale)")
    ax_loss.set_title("(c) training loss (thin: single seeds, dotted: not completed)")
    ax_loss.grid(alpha=0.3)
    ax_loss.grid(alpha=0.08, which="minor")

    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# The report


def write_report(runs: Sequence[dict], out_dir: Path, console: Optional[Console] = None) -> dict:
    """Print the group table and write report.md, report.csv and report.png into ``out_dir``.

    Returns {"varied": the group keys, "groups": group_runs' groups, "files": the written paths}."""
    console = console or Console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    kept, differing = varied_keys(runs)
    header, rows = group_table_rows(groups, kept)

    table = Table(title=f"{len(runs)} runs, {len(groups)} group{'s' * (len(groups) != 1)}")
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i < max(len(kept), 1) else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    problems = [r for r in runs if r["status"] != "completed"]
    for r in problems:
        console.print(f"[yellow]{r['status']}[/] {r['run']}" + (f": {_one_line(r['error'], 200)}" if r["error"] else ""),
                      soft_wrap=True, markup=True, highlight=False)

    # report.md
    done = sum(r["status"] == "completed" for r in runs)
    failed = sum(r["status"] in ("failed", "unreadable") for r in runs)
    run_header = ["run", *kept, "seed", "status", "acc strict", "acc flexible", "test problems", "tokens seen",
                  "train time", "final loss", "error"]
    run_rows = []
    for g in groups:
        for r in sorted(g["runs"], key=lambda r: (_compact(r["seed"]), r["run"])):
            m = r["metrics"]
            run_rows.append([_rel(r["run"], out_dir), *(_display(r["params"].get(k)) for k in kept), _display(r["seed"]),
                             r["status"], _fmt_number(m["accuracy_strict"], "acc"),
                             _fmt_number(m["accuracy_flexible"], "acc"), _display(m["n"]),
                             _fmt_number(m["tokens_seen"], "tokens"), _fmt_number(m["train_time_s"], "time"),
                             _fmt_number(m["final_loss"], "loss"), _one_line(r["error"])])
    md = [
        "# clpd report", "",
        f"{len(runs)} runs: {done} completed, {failed} failed, {len(runs) - done - failed} unfinished. "
        f"Varied: {', '.join(f'`{k}`' for k in kept) or 'only the seed'}.", "",
        "Accuracy is the final student's test accuracy as a fraction (strict: the `#### N` answer; flexible: the "
        "last number of the output), mean ± sample std (ddof=1) over the completed seeds. "
        + (f"Δ is the paired difference of strict accuracy to `{METHOD_KEY}={BASELINE_VALUE}` over the seeds both "
           "completed, with a 95% t-interval. " if any(g["is_baseline"] for g in groups) else "")
        + "n counts the completed seeds; failed and unfinished runs are listed below.", "",
        "## Groups", "", _md_table(header, rows), "",
        "## Runs", "", _md_table(run_header, run_rows), "",
        "![accuracy per group, by difficulty, training loss](report.png)", "",
    ]
    _write_text(out_dir / "report.md", "\n".join(md))

    # report.csv: one row per run, every column, full precision
    columns = _csv_columns(runs, kept, differing)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for g in groups:
        for r in g["runs"]:
            writer.writerow([_csv_value(r, c) for c in columns])
    _write_text(out_dir / "report.csv", buffer.getvalue())

    plot_report(runs, groups, kept, out_dir / "report.png")
    files = [out_dir / f"report.{ext}" for ext in ("md", "csv", "png")]
    console.print(f"report written to {out_dir / 'report.md'} (.csv, .png)", soft_wrap=True, highlight=False)
    return {"varied": kept, "groups": groups, "files": files}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line through the usual error path, not usage + exit 2
        raise ClpdError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="clpd report", description="Tables and plots over clpd run dirs: report.md, report.csv and "
                                                   "report.png, and a table on the console.")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="a run dir, a sweep dir, or a folder containing them (searched at any depth)")
    p.add_argument("--out", metavar="DIR",
                   help="where report.md/.csv/.png go (default: the PATH when one is given, else the current dir)")
    return p


def run_report(argv: Sequence[str], console: Optional[Console] = None) -> dict:
    args = _parser().parse_args(list(argv))
    if not args.paths:
        raise ClpdError("give at least one PATH: a run dir, a sweep dir, or a folder containing them")
    runs = collect_runs(args.paths)
    if not runs:
        raise ClpdError(f"no runs under {', '.join(args.paths)} (a run dir holds .hydra/config.yaml and "
                        ".hydra/overrides.yaml)")
    out = Path(args.out) if args.out else Path(args.paths[0]) if len(args.paths) == 1 else Path.cwd()
    if out.exists() and not out.is_dir():
        raise ClpdError(f"--out {out} is not a directory")
    return write_report(runs, out, console)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``clpd report PATH... [--out DIR]``; returns the exit status (0, or 1 after a one-line error).

    The ``clpd`` dispatcher calls ``main()`` with the arguments in ``sys.argv`` and ignores the
    return value, so in that case a failure leaves through ``SystemExit(1)``."""
    try:
        run_report(sys.argv[1:] if argv is None else argv)
        code = 0
    except ClpdError as exc:
        print(f"clpd report: error: {exc}", file=sys.stderr)
        code = 1
    if argv is None and code:
        raise SystemExit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
