"""The capacity-gap figure: the student's final test accuracy against the size of the one teacher it
learned from (``teachers.schedule=fixed``), with the paired 95% interval of each rung against the
best rung, and SFT (no teacher) as a band.

    python scripts/gap_figure.py docs/results/arith-gap/gap/runs --out docs/results/arith-gap/gap

Reads the records alone (as ``clpd report`` does); writes ``gap.png`` and ``gap.md`` (the table the
figure draws, with the sentence it supports) into ``--out``. The best rung is the one with the
highest mean final accuracy; every rung and SFT is compared to it, seed by seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

import numpy as np

from clpd.report.records import collect_runs
from clpd.report import tables
from clpd.report.stats import by_seed, compared


def rung_of(run: dict) -> str:
    """The run's teacher (``teachers.fixed``), or "sft" for a run without one."""
    if run["params"].get("distill.loss") == "sft" or run["params"].get("method") == "sft":
        return "sft"
    return str(run["params"].get("teachers.fixed"))


def teacher_sizes(runs: List[dict]) -> Dict[str, int]:
    """Parameters of each rung, from the runs' teachers.json."""
    sizes: Dict[str, int] = {}
    for r in runs:
        path = Path(r["run"]) / "teachers.json"
        if path.is_file():
            for t in json.loads(path.read_text()):
                if t.get("parameters"):
                    sizes[t["name"]] = int(t["parameters"])
    return sizes


def gap_table(runs: List[dict]) -> List[dict]:
    """One row per rung and SFT: mean, std, n and the paired difference to the best rung."""
    arms: Dict[str, List[dict]] = {}
    for r in runs:
        arms.setdefault(rung_of(r), []).append(r)
    per_seed = {arm: by_seed(rs) for arm, rs in arms.items()}
    sizes = teacher_sizes(runs)
    means = {arm: float(np.mean(list(v.values()))) for arm, v in per_seed.items() if v}
    best = max((a for a in means if a != "sft"), key=means.get)
    rows = []
    for arm, values in per_seed.items():
        if not values:
            continue
        acc = list(values.values())
        rows.append({"arm": arm, "parameters": sizes.get(arm), "mean": means[arm], "n": len(acc),
                     "std": float(np.std(acc, ddof=1)) if len(acc) > 1 else None, "best": arm == best,
                     "vs_best": None if arm == best else compared(values, per_seed[best], best), "by_seed": values})
    return sorted(rows, key=lambda r: (r["parameters"] is not None, r["parameters"] or 0))


def seed_table(rows: List[dict]) -> str:
    """Final accuracy seed by seed, one column per arm of ``gap_table``: the blocks the intervals pair."""
    return tables.seed_table({r["arm"]: r["by_seed"] for r in rows}) + "\n"


def _fmt(x: float) -> str:
    return f"{x:+.3f}"


def write_markdown(rows: List[dict], out: Path, seeds: str = "") -> str:
    best = next(r for r in rows if r["best"])
    lines = ["| teacher | parameters | final acc strict (mean ± std) | n | Δ vs best rung [95% CI] | Δ detectable |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        vs = r["vs_best"]
        if r["best"]:
            delta = "best"
        elif vs and vs["low"] is not None:
            delta = f"{_fmt(vs['mean'])} [{_fmt(vs['low'])}, {_fmt(vs['high'])}] ({vs['n']} pairs)"
        else:
            delta = f"{_fmt(vs['mean'])} ({vs['n']} pair, no interval)" if vs and vs["mean"] is not None else "-"
        mde = f"±{vs['mde']:.3f}" if vs and vs.get("mde") is not None else "-"
        size = f"{r['parameters'] / 1e6:.3f}M" if r["parameters"] else "-"
        std = f" ± {r['std']:.3f}" if r["std"] is not None else ""
        lines.append(f"| {r['arm']} | {size} | {r['mean']:.3f}{std} | {r['n']} | {delta} | {mde} |")
    strongest = max((r for r in rows if r["parameters"]), key=lambda r: r["parameters"])
    if strongest["best"]:
        verdict = (f"The strongest teacher ({strongest['arm']}) gives the best student here: no rung's student is "
                   f"better than its student.")
    elif strongest["vs_best"]["low"] is None:
        vs = strongest["vs_best"]
        verdict = (f"The strongest teacher ({strongest['arm']}) gives a student {_fmt(vs['mean'])} behind the best "
                   f"rung ({best['arm']}) on {vs['n']} paired seed{'s' * (vs['n'] != 1)}: too few for an interval.")
    else:
        vs = strongest["vs_best"]
        worse = vs["high"] < 0
        verdict = (f"The strongest teacher ({strongest['arm']}) gives a student {_fmt(vs['mean'])} "
                   f"[{_fmt(vs['low'])}, {_fmt(vs['high'])}] behind the best rung ({best['arm']}): "
                   + ("a worse student, outside the interval of no difference." if worse else
                      "not separable from the best rung's at this number of seeds."))
    text = "\n".join(lines) + "\n\n" + verdict + "\n" + (f"\nBy seed:\n\n{seeds}" if seeds else "")
    (out / "gap.md").write_text(text)
    return text


def plot(rows: List[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rungs = [r for r in rows if r["parameters"]]
    best = next(r for r in rows if r["best"])
    xs = [r["parameters"] for r in rungs]
    ax.plot(xs, [r["mean"] for r in rungs], color="C0", marker="o", label="student from this teacher (mean)")
    for r in rungs:
        vs = r["vs_best"]
        if vs and vs["low"] is not None:  # the paired interval, drawn around the best rung's mean
            ax.errorbar(r["parameters"], best["mean"] + vs["mean"], yerr=[[-(vs["low"] - vs["mean"])], [vs["high"] - vs["mean"]]],
                        color="C3", capsize=5, marker="_", markersize=10)
        ax.annotate(r["arm"], (r["parameters"], r["mean"]), textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.errorbar([], [], yerr=[], color="C3", capsize=5, label="paired 95% CI vs the best rung")
    sft = next((r for r in rows if r["arm"] == "sft"), None)
    if sft:
        ax.axhline(sft["mean"], color="0.4", linestyle="--", label="SFT, no teacher (mean)")
    ax.set_xscale("log")
    ax.set_xlabel("teacher parameters")
    ax.set_ylabel("student final accuracy (strict)")
    n = max((r["n"] for r in rows), default=0)
    ax.set_title(f"Student accuracy against teacher size ({n} paired seeds)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "gap.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", help="the gap sweep's run dirs (a folder above them)")
    parser.add_argument("--out", required=True, help="where gap.png and gap.md go")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = gap_table(collect_runs([args.runs]))
    plot(rows, out)
    print(write_markdown(rows, out, seed_table(rows)), end="")


if __name__ == "__main__":
    main()
