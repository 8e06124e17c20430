"""The one exception type that clpd reports to users as a single line (no traceback)."""

from typing import Optional


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
