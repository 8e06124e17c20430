"""The report's tables and files: report.md (one table per metric family, the paired
differences to a baseline group), report.csv (one row per run) and report.png, from runs read by
:mod:`clpd.report.records` and grouped by :mod:`clpd.report.stats`. What the columns and groups
are is described in :mod:`clpd.commands.report`."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from rich.console import Console
from rich.table import Table

from clpd.errors import ClpdError
from clpd.files import write_text
from clpd.report.plot import plot_report
from clpd.report.records import EXTRA_METRICS, METRICS, _compact
from clpd.report.stats import BASELINE, BASELINE_VALUE, _display, group_runs, spelled, varied_keys


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


def _fmt_delta(g: dict, key: str = "vs_baseline") -> str:
    d = g[key]
    if g["is_baseline"]:
        return "baseline"
    if d is None:
        return "-"
    if d["n"] == 0:
        return "no paired seeds"
    if d["low"] is None:
        return f"{d['mean']:+.3f} (1 pair, no CI)"
    builds = d.get("builds") or 0
    blocks = f", {builds} teacher build{'s' * (builds > 1)}" if builds else ""
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] ({d['n']} pairs{blocks})"


def _fmt_detectable(g: dict) -> str:
    d = g["vs_baseline"]
    if g["is_baseline"] or d is None or d.get("mde") is None:
        return "-"
    return f"±{d['mde']:.3f}"


def _fmt_n(g: dict) -> str:
    extra = [f"+{g['failed']} failed"] * bool(g["failed"]) + [f"+{g['unfinished']} unfinished"] * bool(g["unfinished"])
    return f"{g['completed']}" + (f" ({', '.join(extra)})" if extra else "")


DETECTABLE = "Δ detectable"
DELTA = f"Δ strict vs {BASELINE_VALUE} [95% CI]"
CURVE, CURVE_DELTA = "curve acc", f"Δ curve vs {BASELINE_VALUE} [95% CI]"


def delta_headers(baseline: Tuple[str, str] = BASELINE) -> Tuple[str, str]:
    """The Δ column headers: "Δ strict vs standard_kd [95% CI]" for the default baseline (as before
    ``--baseline`` existed), "Δ strict vs KEY=VALUE [95% CI]" for any other."""
    if tuple(baseline) == BASELINE:
        return DELTA, CURVE_DELTA
    name = "=".join(baseline)
    return f"Δ strict vs {name} [95% CI]", f"Δ curve vs {name} [95% CI]"


def group_table_rows(groups: Sequence[dict], kept: Sequence[str],
                     baseline: Tuple[str, str] = BASELINE) -> Tuple[List[str], List[List[str]]]:
    compared = any(g["is_baseline"] for g in groups)  # else no Δ columns: nothing to compare with
    curves = any(g["curve_accuracy"]["values"] for g in groups)  # else no run has a learning curve
    delta, curve_delta = delta_headers(baseline)
    columns = [("acc strict", True, lambda g: _fmt_stats(g["accuracy_strict"], "acc")),
               ("acc flexible", True, lambda g: _fmt_stats(g["accuracy_flexible"], "acc")),
               (delta, compared, _fmt_delta),
               (DETECTABLE, compared, _fmt_detectable),
               (CURVE, curves, lambda g: _fmt_stats(g["curve_accuracy"], "acc")),
               (curve_delta, compared and curves, lambda g: _fmt_delta(g, "vs_baseline_curve")),
               ("tokens seen", True, lambda g: _fmt_stats(g["tokens_seen"], "tokens")),
               ("train time", True, lambda g: _fmt_stats(g["train_time_s"], "time")),
               ("n", True, _fmt_n)]
    columns = [(name, cell) for name, shown, cell in columns if shown]
    header = [*kept] if kept else ["runs"]
    header += [name for name, _ in columns]
    rows = [[*(_display(g["params"][k]) for k in kept)] if kept else [g["label"]] for g in groups]
    for row, g in zip(rows, groups):
        row += [cell(g) for _, cell in columns]
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


def _csv_columns(runs: Sequence[dict], kept: Sequence[str], differing: Sequence[str]) -> List[str]:
    difficulties = sorted({d for r in runs for d in r["by_difficulty"]})
    columns = ["run", "status", "error", "group", *kept, "seed", "teacher_outputs", *METRICS, *EXTRA_METRICS]
    columns += [f"accuracy_strict_steps_{d}" for d in difficulties]
    columns += [k for k in differing if k not in columns]
    return columns


def _csv_value(run: dict, column: str) -> Any:
    if column in ("run", "status", "error", "group", "seed", "teacher_outputs"):
        value = run.get(column)
    elif column in run["metrics"]:
        value = run["metrics"][column]
    elif column.startswith("accuracy_strict_steps_"):
        value = (run["by_difficulty"].get(int(column.rsplit("_", 1)[1])) or {}).get("accuracy_strict")
    else:
        value = run["params"].get(column)
    return "" if value is None else value


def check_baseline(runs: Sequence[dict], baseline: Tuple[str, str]) -> None:
    """Refuse (one line) a ``--baseline KEY=VALUE`` that no run has, or whose KEY does not tell the
    groups apart; the message names the key and the values the runs have (or the keys that vary)."""
    key, value = baseline
    kept, _ = varied_keys(runs)
    keys = ", ".join(kept) or "none: the runs differ only by seed"
    if not any(key in r["params"] for r in runs):
        raise ClpdError(f"--baseline {key}={value}: no run has a parameter {key} (the keys the groups differ by: {keys})")
    have = sorted({spelled(r["params"].get(key)) for r in runs})
    if value not in have:
        raise ClpdError(f"--baseline {key}={value}: no run has {key}={value}; the runs have {key}={', '.join(have)}")
    if key not in kept:
        raise ClpdError(f"--baseline {key}={value}: {key} (values {', '.join(have)}) is not one of the keys the "
                        f"groups differ by: {keys}")


def _print_table(console: Console, title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
                 n_kept: int) -> None:
    """A groups table on the console, without the detectable-difference column: report.md has it,
    and a terminal is narrow."""
    table = Table(title=title)
    shown = [i for i, column in enumerate(header) if column != DETECTABLE]
    for i in shown:
        table.add_column(header[i], justify="left" if i < max(n_kept, 1) else "right")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    console.print(table)


def _print_problems(console: Console, runs: Sequence[dict]) -> None:
    """One line per run that did not complete, with its error."""
    for r in runs:
        if r["status"] != "completed":
            error = f": {_one_line(r['error'], 200)}" if r["error"] else ""
            console.print(f"[yellow]{r['status']}[/] {r['run']}{error}", soft_wrap=True, markup=True, highlight=False)


def _run_table(groups: Sequence[dict], kept: Sequence[str], out_dir: Path) -> Tuple[List[str], List[List[str]]]:
    """report.md's table of runs: one row per run, group by group, in seed order."""
    header = ["run", *kept, "seed", "status", "teacher outputs", "acc strict", "acc flexible", "test problems",
              "tokens seen", "train time", "final loss", "error"]
    rows = []
    for g in groups:
        for r in sorted(g["runs"], key=lambda r: (_seed_order(r["seed"]), r["run"])):
            m = r["metrics"]
            rows.append([_rel(r["run"], out_dir), *(_display(r["params"].get(k)) for k in kept), _display(r["seed"]),
                         r["status"], r["teacher_outputs"] or "-", _fmt_number(m["accuracy_strict"], "acc"),
                         _fmt_number(m["accuracy_flexible"], "acc"), _display(m["n"]),
                         _fmt_number(m["tokens_seen"], "tokens"), _fmt_number(m["train_time_s"], "time"),
                         _fmt_number(m["final_loss"], "loss"), _one_line(r["error"])])
    return header, rows


def _method_text(groups: Sequence[dict], header: Sequence[str], baseline: Tuple[str, str]) -> str:
    """report.md's paragraph on what the numbers are: accuracy, Δ and its pairs (when a baseline group
    exists), curve acc (when shown), n."""
    pairs = "; ".join(f"{g['label']} vs {g['vs_baseline']['baseline']}" for g in groups if g["vs_baseline"])
    rule = "" if baseline == BASELINE else (
        f"Each group is compared to the `{'='.join(baseline)}` group that agrees with it on the other varied keys, "
        f"skipping keys on which no `{'='.join(baseline)}` group has its value; compared: {pairs or 'none'}. ")
    return ("Accuracy is the final student's test accuracy as a fraction (strict: the `#### N` answer; flexible: the "
            "last number of the output), mean ± sample std (ddof=1) over the completed seeds. "
            + (f"Δ is the paired difference of strict accuracy to `{'='.join(baseline)}` over the seeds both "
               "completed (and, where both learned from teachers, the same build of the ladder: the weights' "
               "sha256 in the run's manifest), with a 95% t-interval. " + rule
               + f"{DETECTABLE} is the true difference that as many pairs would detect with 80% power "
               "(two-sided, 5%), from the measured spread of the paired differences: (t_0.975 + t_0.80) × sd / √n. "
               if any(g["is_baseline"] for g in groups) else "")
            + ("Curve acc is the mean test accuracy over a run's learning curve (its `trainer.eval_every` evaluations): "
               "how soon it learned, where the final accuracy says how far. " if CURVE in header else "")
            + "n counts the completed seeds; failed and unfinished runs are listed below.")


def against(runs: Sequence[dict], kept: Sequence[str], baseline: Tuple[str, str]) -> Tuple[List[str], List[List[str]], List[dict]]:
    """A further baseline's table: the group columns and the Δ columns of the groups table, against
    ``baseline``; with the groups (their ``vs_baseline`` against it)."""
    groups = group_runs(runs, baseline)
    header, rows = group_table_rows(groups, kept, baseline)
    shown = [i for i, column in enumerate(header) if i < max(len(kept), 1) or column.startswith("Δ")]
    return [header[i] for i in shown], [[row[i] for i in shown] for row in rows], groups


def _against_md(table: Tuple[List[str], List[List[str]], List[dict]], baseline: Tuple[str, str]) -> List[str]:
    header, rows, groups = table
    name = "=".join(baseline)
    pairs = "; ".join(f"{g['label']} vs {g['vs_baseline']['baseline']}" for g in groups if g["vs_baseline"])
    return [f"## Against `{name}`", "",
            f"Δ as above, against the `{name}` group that agrees with each group on the other varied keys; "
            f"compared: {pairs or 'none'}.", "", _md_table(header, rows), ""]


def _seed_order(seed: Any) -> tuple:
    return (0, seed, "") if isinstance(seed, (int, float)) and not isinstance(seed, bool) else (1, 0, str(seed))


def seed_table(by_column: Dict[str, Dict[Any, float]]) -> str:
    """Final accuracy seed by seed in markdown: one row per seed, one column per group (``by_seed``'s
    values; a seed run on several teacher builds shows each): the blocks the paired intervals pair,
    and how much of the spread is the seed's, shared by every group."""
    cells: Dict[Any, Dict[str, List[float]]] = {}
    for column, values in by_column.items():
        for key, value in values.items():
            cells.setdefault(getattr(key, "seed", key), {}).setdefault(column, []).append(value)
    rows = [[_display(seed), *(" / ".join(f"{v:.3f}" for v in row.get(c, [])) or "-" for c in by_column)]
            for seed, row in sorted(cells.items(), key=lambda item: _seed_order(item[0]))]
    return _md_table(["seed", *by_column], rows)


def _markdown(runs: Sequence[dict], groups: Sequence[dict], kept: Sequence[str], header: Sequence[str],
              rows: Sequence[Sequence[str]], baseline: Tuple[str, str], out_dir: Path,
              further: Sequence[str] = ()) -> str:
    """report.md: the counts, what the numbers are, the group table, the tables against ``further``
    baselines (markdown lines), the run table and the figure."""
    done = sum(r["status"] == "completed" for r in runs)
    failed = sum(r["status"] in ("failed", "unreadable") for r in runs)
    run_header, run_rows = _run_table(groups, kept, out_dir)
    md = [
        "# clpd report", "",
        f"{len(runs)} runs: {done} completed, {failed} failed, {len(runs) - done - failed} unfinished. "
        f"Varied: {', '.join(f'`{k}`' for k in kept) or 'only the seed'}.", "",
        _method_text(groups, header, baseline), "",
        "## Groups", "", _md_table(header, rows), "", *further,
        "## By seed", "", "Final strict accuracy of each completed run: the blocks the paired differences pair.", "",
        seed_table({g["label"]: g["accuracy_by_seed"] for g in groups}), "",
        "## Runs", "", _md_table(run_header, run_rows), "",
        "![accuracy per group, by difficulty, training loss](report.png)", "",
    ]
    return "\n".join(md)


def _csv_text(runs: Sequence[dict], groups: Sequence[dict], kept: Sequence[str], differing: Sequence[str]) -> str:
    """report.csv: one row per run, group by group, every column, full precision."""
    columns = _csv_columns(runs, kept, differing)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for g in groups:
        for r in g["runs"]:
            writer.writerow([_csv_value(r, c) for c in columns])
    return buffer.getvalue()


def write_report(runs: Sequence[dict], out_dir: Path, console: Optional[Console] = None,
                 baselines: Sequence[Tuple[str, str]] = (BASELINE,)) -> dict:
    """Print the group table and write report.md, report.csv and report.png into ``out_dir``;
    each of ``baselines`` (KEY, VALUE) picks the groups that the others are compared to (see
    ``group_runs``): the first in the groups table, each further one in a table of its own.

    Returns {"varied": the group keys, "groups": group_runs' groups against the first baseline,
    "against": {"KEY=VALUE": the groups against each further baseline}, "files": the written paths}."""
    console = console or Console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    baseline, *more = [tuple(b) for b in baselines]
    kept, differing = varied_keys(runs)
    tables = {b: against(runs, kept, b) for b in more}
    groups = group_runs(runs, baseline)
    header, rows = group_table_rows(groups, kept, baseline)

    _print_table(console, f"{len(runs)} runs, {len(groups)} group{'s' * (len(groups) != 1)}", header, rows, len(kept))
    for b, (b_header, b_rows, _) in tables.items():
        _print_table(console, f"against {'='.join(b)}", b_header, b_rows, len(kept))
    _print_problems(console, runs)
    further = [line for b, table in tables.items() for line in _against_md(table, b)]
    write_text(out_dir / "report.md", _markdown(runs, groups, kept, header, rows, baseline, out_dir, further))
    write_text(out_dir / "report.csv", _csv_text(runs, groups, kept, differing))
    plot_report(runs, groups, kept, out_dir / "report.png")
    files = [out_dir / f"report.{ext}" for ext in ("md", "csv", "png")]
    console.print(f"report written to {out_dir / 'report.md'} (.csv, .png)", soft_wrap=True, highlight=False)
    return {"varied": kept, "groups": groups, "against": {"=".join(b): t[2] for b, t in tables.items()}, "files": files}
