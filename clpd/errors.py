"""The exceptions clpd reports to users as a single line (no traceback), and the collector that
reports every problem of a check at once."""

from typing import Callable, Optional, Type, TypeVar

T = TypeVar("T")


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of a library's exception, to quote in a ClpdError."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class ClpdError(Exception):
    """A problem with the user's input: a config value, a path, a data file.

    The CLI prints ``clpd <command>: error: <message>`` and exits with status 1, so the message
    must name the offending key, path or line, and the allowed values where there are any.
    """


class Interrupted(Exception):
    """SIGINT, SIGTERM or a scheduler's SIGUSR2 stopped a run after it saved a checkpoint. The CLI
    prints the message (how to resume) on one line and exits with 128 + the signal number (130 for
    SIGINT, 143 for SIGTERM, 140 for SIGUSR2). ``hand_on``: a signal whose earlier handler (submitit's
    requeue) is to be called first, once the run's status is recorded."""

    def __init__(self, signum: int, message: str, resumable: bool = True, hand_on: Optional[int] = None) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum
        self.resumable = resumable
        self.hand_on = hand_on


class Problems(list):
    """Every problem one check finds, reported together in one line (as litgpt does): a user who
    mistyped two things on a long command line learns both from one try. Each message names its
    key and the allowed values."""

    def check(self, ok: bool, message: str) -> None:
        """Note ``message`` unless ``ok``."""
        if not ok:
            self.append(message)

    def guard(self, prefix: str, check: Callable[[], T]) -> Optional[T]:
        """Run ``check``; a ClpdError it raises becomes a problem (after ``prefix``, the key) and
        None is returned, so the checks after it still run."""
        try:
            return check()
        except ClpdError as exc:
            self.append(f"{prefix}: {exc}" if prefix else str(exc))
            return None

    def raise_if_any(self, prefix: str = "", error: Type[Exception] = ClpdError) -> None:
        """Raise ``error`` with all problems in one line (their own line breaks folded), if any."""
        if self:
            raise error(prefix + "; ".join(" ".join(p.split()) for p in self))
