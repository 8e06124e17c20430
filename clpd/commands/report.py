"""``clpd report PATH... [--out DIR] [--baseline KEY=VALUE]...``: tables and plots over run dirs.

PATH is a run dir, a sweep dir, or any folder above them: every dir holding ``.hydra/config.yaml``
and ``.hydra/overrides.yaml`` is a run (teacher caches have no ``.hydra`` and are not). Each run
becomes a row, failed and unfinished ones included. Runs whose configs differ only by ``seed`` form a
group (mean ± sample std over the completed seeds); when the groups differ by ``method`` and one of
them is ``standard_kd``, every other group gets the paired difference of strict accuracy to it over
the seeds both completed, with a 95% t-interval. Written into ``--out`` (default: the single PATH, or
the current directory): ``report.md``, ``report.csv`` (one row per run) and ``report.png``.

``--baseline KEY=VALUE`` compares to other groups than ``method=standard_kd``: each group to the
group with KEY=VALUE that agrees with it on the other varied keys, skipping keys on which no KEY=VALUE
group has its value (:func:`clpd.report.stats.group_runs`); e.g. ``distill.teacher_outputs=live``
pairs every stored group with the live group of the same method. VALUE is spelled as in an override:
a string as it is, ``null``, ``true``, ``8``. A KEY that no run has, a VALUE that no run has, or a
KEY that does not tell the groups apart (``seed``, or a key another one explains) is refused.
Given more than once, the first baseline fills the groups table and each further one adds a table of
the differences against it (e.g. ``--baseline method=standard_kd --baseline method=sft``: every arm
against standard KD, then against SFT).

Which columns a table shows: the config keys that differ between the runs, minus the ones that a
key shown before them already explains. Keys are considered in the order the user chose them (the
command-line overrides, e.g. ``method``), then Hydra's group choices, then the composed config; so a
sweep over ``method`` shows ``method`` and not the ``distill.loss``/``curriculum.*`` values that each
method preset sets.

This is a plain argparse command, not a Hydra app: it reads runs, it does not make one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, Tuple

from rich.console import Console

from clpd.errors import ClpdError
from clpd.report.records import collect_runs
from clpd.report.stats import BASELINE
from clpd.report.tables import check_baseline, write_report


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
    p.add_argument("--baseline", metavar="KEY=VALUE", action="append",
                   help="compare each group to the group with KEY=VALUE that agrees with it on the other varied keys "
                        "(skipping keys on which no such group has its value), e.g. distill.teacher_outputs=live; "
                        "default: method=standard_kd; give it again for a table against each further baseline")
    return p


def _baseline(text: str) -> Tuple[str, str]:
    key, eq, value = text.partition("=")
    if not key or not eq:
        raise ClpdError(f"--baseline {text}: give KEY=VALUE, e.g. --baseline distill.teacher_outputs=live")
    return key, value


def run_report(argv: Sequence[str], console: Optional[Console] = None) -> dict:
    args = _parser().parse_args(list(argv))
    if not args.paths:
        raise ClpdError("give at least one PATH: a run dir, a sweep dir, or a folder containing them")
    runs = collect_runs(args.paths)
    if not runs:
        raise ClpdError(f"no runs under {', '.join(args.paths)} (a run dir holds .hydra/config.yaml and "
                        ".hydra/overrides.yaml)")
    baselines = [BASELINE]
    if args.baseline:
        baselines = [_baseline(text) for text in args.baseline]
        for baseline in baselines:
            check_baseline(runs, baseline)
    out = Path(args.out) if args.out else Path(args.paths[0]) if len(args.paths) == 1 else Path.cwd()
    if out.exists() and not out.is_dir():
        raise ClpdError(f"--out {out} is not a directory")
    return write_report(runs, out, console, baselines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``clpd report PATH... [--out DIR] [--baseline KEY=VALUE]...``; returns the exit status (0, or 1 after a one-line error).

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

