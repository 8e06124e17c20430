"""Tables and plots over run dirs, for ``clpd report`` (:mod:`clpd.commands.report`): reading run
dirs is :mod:`clpd.report.records`, groups and statistics :mod:`clpd.report.stats`, the tables and
files :mod:`clpd.report.tables`, the figure :mod:`clpd.report.plot`."""
