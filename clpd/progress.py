"""Progress on the console: a live rich bar on a terminal, and none in a log file or CI, where rich
would print the bar's last frame cut to the console's width; there the callers print plain lines
(:func:`plain_lines` says when)."""

from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.progress import Progress, ProgressColumn


def plain_lines(console: Optional[Console]) -> bool:
    """Whether progress goes to ``console`` as plain lines (it is not a terminal)."""
    return console is not None and not console.is_terminal


def progress_bar(console: Optional[Console], *columns: ProgressColumn) -> Progress:
    """A live bar on a terminal; disabled without a console or without a terminal."""
    return Progress(*columns, console=console, disable=console is None or plain_lines(console))
