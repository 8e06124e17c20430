"""The report figure: accuracy per group, accuracy by difficulty, training-loss curves."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from clpd.files import atomic_path


def _wrap(label: str, width: int) -> str:
    """A tick label in lines of about ``width`` characters, broken after ``_``, ``,``, ``/`` or a space."""
    lines, line = [], ""
    for piece in re.split(r"(?<=[_, /])", label):
        if line and len(line) + len(piece) > width:
            lines.append(line.rstrip())
            line = ""
        line += piece
    return "\n".join(lines + [line.rstrip()])


def _mean_band(ax, xs, per, color, label) -> None:
    """Mean over seeds of each x's values as a line with markers, ± the sample std as a band."""
    mean = np.array([np.mean(v) if v else np.nan for v in per])
    std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in per])
    ax.plot(xs, mean, marker="o", color=color, label=label)
    ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)


def _title(runs: Sequence[dict], groups: Sequence[dict], kept: Sequence[str]) -> str:
    """The figure's title: how many runs and groups, how many failed or did not finish, what varies."""
    n_failed = sum(r["status"] in ("failed", "unreadable") for r in runs)
    n_unfinished = sum(r["status"] in ("unfinished", "interrupted") for r in runs)
    return (f"clpd report: {len(runs)} runs in {len(groups)} group{'s' * (len(groups) != 1)}"
            f" ({n_failed} failed, {n_unfinished} unfinished); varied: {', '.join(kept) or 'nothing but seed'}")


def _accuracy_bars(ax, groups: Sequence[dict], colors: Sequence[str]) -> float:
    """Panel (a)'s bars (mean ± std) and seed dots, or a note where a group has no accuracy; returns
    the highest value drawn, for the y limit."""
    rng = np.random.default_rng(0)  # jitter of the seed dots, fixed so the figure is reproducible
    top, seed_labelled = 0.0, False
    for i, g in enumerate(groups):
        s = g["accuracy_strict"]
        if s["mean"] is None:
            ax.text(i, 0.5, "no test\naccuracy" if g["completed"] else "no completed\nruns", ha="center",
                    va="center", fontsize=9, color="0.4", transform=ax.get_xaxis_transform())
            continue
        ax.bar(i, s["mean"], color=colors[i], alpha=0.6, width=0.6,
               yerr=s["std"] if s["std"] is not None else None, capsize=6, ecolor="black")
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(s["values"])), s["values"], color="black", s=18, zorder=3,
                   label=None if seed_labelled else "one seed")  # on the first group drawn, not on group 0
        seed_labelled = True
        top = max(top, s["mean"] + (s["std"] or 0), *s["values"])
    return top


def _accuracy_panel(ax, groups: Sequence[dict], kept: Sequence[str], colors: Sequence[str]) -> None:
    """(a) final test accuracy per group: bars, seed dots, and how many seeds each bar stands for."""
    top = _accuracy_bars(ax, groups, colors)
    for i, g in enumerate(groups):  # how many seeds each bar stands for, at its foot
        extra = [f"+{g[k]} {k}" for k in ("failed", "unfinished") if g[k]]
        ax.text(i, 0.005, "\n".join([f"n={g['completed']}", *extra]), ha="center", va="bottom", fontsize=8,
                color="0.15")
    ax.set_xticks(np.arange(len(groups)), [_wrap(g["label"], max(6, 60 // max(len(groups), 1))) for g in groups],
                  fontsize=9)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(0, min(1.0, max(0.1, top * 1.15 + 0.02)) if top > 0 else 1.0)
    ax.set_xlabel(" / ".join(kept) or "group")
    ax.set_ylabel("strict accuracy (fraction correct)")
    ax.set_title("(a) final test accuracy (bar: mean, whisker: ± std, dot: seed)")
    ax.grid(axis="y", alpha=0.3)
    if any(g["accuracy_strict"]["values"] for g in groups):
        ax.legend(loc="upper left", fontsize=8)


def _difficulty_panel(ax, groups: Sequence[dict], colors: Sequence[str]) -> None:
    """(b) strict accuracy by difficulty (reasoning steps): each group's mean over its completed seeds."""
    drawn = False
    for i, g in enumerate(groups):
        done = [r for r in g["runs"] if r["status"] == "completed" and r["by_difficulty"]]
        steps = sorted({d for r in done for d in r["by_difficulty"]})
        if not steps:
            continue
        per = [[r["by_difficulty"][d]["accuracy_strict"] for r in done
                if d in r["by_difficulty"] and r["by_difficulty"][d].get("accuracy_strict") is not None] for d in steps]
        _mean_band(ax, steps, per, colors[i], f"{g['label']} (n={len(done)})")
        drawn = True
    if drawn:
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(0, 1.02)
    else:
        ax.text(0.5, 0.5, "no per-difficulty metrics", ha="center", va="center", transform=ax.transAxes,
                color="0.4")
    ax.set_xlabel("reasoning steps (difficulty)")
    ax.set_ylabel("strict accuracy (fraction correct)")
    ax.set_title("(b) accuracy by difficulty: mean over seeds (band: ± std)")
    ax.grid(alpha=0.3)


def _loss_curves(ax, groups: Sequence[dict], colors: Sequence[str]) -> bool:
    """Panel (c)'s lines: every run's loss curve thin (dotted if it did not complete), each group's mean
    over its completed runs thick; whether any mean was drawn."""
    drawn = False
    for i, g in enumerate(groups):
        curves = {id(r): dict((s, l) for s, l in r["curve"] if l > 0) for r in g["runs"] if r["curve"]}
        for r in g["runs"]:
            c = curves.get(id(r))
            if c:
                ax.plot(list(c), list(c.values()), color=colors[i], alpha=0.25, linewidth=0.8,
                        linestyle="-" if r["status"] == "completed" else ":")
        done = [curves[id(r)] for r in g["runs"] if r["status"] == "completed" and curves.get(id(r))]
        if not done:
            continue
        steps = sorted({s for c in done for s in c})
        mean = [np.mean([c[s] for c in done if s in c]) for s in steps]
        ax.plot(steps, mean, color=colors[i], linewidth=2, label=f"{g['label']} (mean of {len(done)})")
        drawn = True
    return drawn


def _log_loss_axis(ax) -> None:
    """A log y axis in plain numbers (0.5, 2), not 5×10^-1; the 2s, 3s and 5s between the powers of
    ten are labelled too when the curves span less than two decades."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    low, high = ax.get_ylim()
    if math.log10(high / low) < 2:
        ax.yaxis.set_minor_formatter(FuncFormatter(
            lambda y, _: f"{y:g}" if round(y / 10 ** math.floor(math.log10(y)), 6) in (2, 3, 5) else ""))
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def _loss_panel(ax, groups: Sequence[dict], colors: Sequence[str]) -> None:
    """(c) training loss per answer token over the optimizer steps, on a log scale."""
    if _loss_curves(ax, groups, colors):
        _log_loss_axis(ax)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no training curves", ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss per answer token (log scale)")
    ax.set_title("(c) training loss, each run's own objective (thin: single seeds, dotted: not completed)")
    ax.grid(alpha=0.3)
    ax.grid(alpha=0.08, which="minor")


def _learning_curve_panel(ax, groups: Sequence[dict], colors: Sequence[str]) -> None:
    """(d) test accuracy during training (``trainer.eval_every``): each group's mean over its completed seeds."""
    drawn = False
    for i, g in enumerate(groups):
        done = [dict(r["eval_curve"]) for r in g["runs"] if r["status"] == "completed" and r["eval_curve"]]
        if not done:
            continue
        steps = sorted({s for c in done for s in c})
        per = [[c[s] for c in done if s in c] for s in steps]
        _mean_band(ax, steps, per, colors[i], f"{g['label']} (n={len(done)})")
        drawn = True
    if drawn:
        ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)
    else:
        ax.text(0.5, 0.5, "no learning curves (trainer.eval_every)", ha="center", va="center",
                transform=ax.transAxes, color="0.4")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("strict accuracy on the eval subset (fraction)")
    ax.set_title("(d) test accuracy during training: plateau or jump? (band: ± std over seeds)")
    ax.grid(alpha=0.3)


def plot_report(runs: Sequence[dict], groups: Sequence[dict], kept: Sequence[str], path: Path) -> None:
    """Four panels: (a) accuracy per group with the seeds as dots, (b) accuracy by difficulty,
    (c) training loss curves, (d) test accuracy during training (``trainer.eval_every``).
    Written atomically."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    colors = [f"C{i % 10}" for i in range(len(groups))]
    fig = Figure(figsize=(16, 10.5), layout="constrained")
    (ax_acc, ax_diff), (ax_loss, ax_curve) = fig.subplots(2, 2)
    fig.suptitle(_title(runs, groups, kept), fontsize=13)
    _accuracy_panel(ax_acc, groups, kept, colors)
    _difficulty_panel(ax_diff, groups, colors)
    _loss_panel(ax_loss, groups, colors)
    _learning_curve_panel(ax_curve, groups, colors)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
