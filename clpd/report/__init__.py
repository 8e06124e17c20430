"""``clpd report``: tables and plots over run dirs.

The command (its parser, the tables, report.md/.csv) is :mod:`clpd.report.command`; reading run
dirs is :mod:`clpd.report.runs`, groups and statistics :mod:`clpd.report.stats`, the figure
:mod:`clpd.report.plot`.
"""

from clpd.report.command import write_report
from clpd.report.runs import collect_runs
from clpd.report.stats import group_runs, paired_difference, t_quantile_975, varied_keys

__all__ = ["collect_runs", "group_runs", "paired_difference", "t_quantile_975", "varied_keys", "write_report"]
