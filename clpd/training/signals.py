"""Stopping a run cleanly: SIGINT, SIGTERM and a scheduler's preemption notice ask the loop to stop
after the current step and write a checkpoint; :func:`hand_on` then passes the notice to the
handler that was there before clpd's (submitit's requeue)."""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

from rich.console import Console



# The notice a scheduler sends before it stops a job: submitit asks SLURM for SIGUSR2 (sbatch
# --signal=USR2@<signal_delay_s>: that long before the time limit, and at once on a preemption)
# and requeues the job from its handler. SUBMITIT_PREEMPT_SIGNAL names another one for both.
PREEMPT_SIGNAL = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)



class StopSignals:
    """SIGINT, SIGTERM and the scheduler's notice (:data:`PREEMPT_SIGNAL`) ask the loop to stop
    after the current optimizer step (``requested`` holds the signal); a second SIGINT or SIGTERM
    stops at once, the notice never does (a step and a checkpoint fit in its delay). ``preempted``
    says that the notice came: the run then hands it on (:func:`hand_on`) once its checkpoint is
    written. Only the main thread can install handlers: elsewhere (a test runner thread, a
    notebook worker) signals keep their default behaviour."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, PREEMPT_SIGNAL)

    def __init__(self, console: Console) -> None:
        self.console = console
        self.requested: Optional[int] = None
        self.preempted = False
        self.announced = False
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == PREEMPT_SIGNAL:
            self.preempted = True
        elif self.requested is not None:  # the second one: stop now (checkpoints are atomic, nothing breaks)
            self.__exit__()
            signal.raise_signal(signum)
            return
        if self.requested is None:
            self.requested = signum  # said by announce(): a handler that printed could interrupt a print (or
            # the import one makes) and enter it again, which rich does not survive

    def announce(self) -> None:
        """Say, once, that a signal came and the run stops after this step (called by the loop)."""
        if self.requested is not None and not self.announced:
            self.announced = True
            self.console.print(f"{signal.Signals(self.requested).name}: finishing this step, then saving a "
                               f"checkpoint (send SIGINT or SIGTERM again to stop at once)", soft_wrap=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}



def hand_on(signum: int) -> None:
    """Call the handler that was installed for ``signum`` before clpd's, once the run has written
    its checkpoint and status. Under submitit that is its requeue: it resubmits the same job (which
    continues from the checkpoint with trainer.resume=auto) and exits the process."""
    handler = signal.getsignal(signum)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signum, None)
