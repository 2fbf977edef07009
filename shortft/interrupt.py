"""Ctrl-C or SIGTERM while training: the step in progress finishes, is checkpointed, and the run stops.

    with stop_requests() as stop:   # in the main thread; in any other (a Ray worker's) nothing changes
        ...                         # the loop, after each step: checkpoint when `stop.signal`, then raise
                                    # Interrupted

Before, the signal ended the process wherever it was, and every step since the last periodic checkpoint
(`train.checkpoint_every`: 200 steps of SD 1.5 in the sd15 config) was trained again on resume. A
scheduler's SIGTERM (Slurm, Kubernetes, a spot node's notice) is met the same way. A second signal acts
at once, as it would have without this.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal after a step and its checkpoint; `code` is the shell's status for it."""

    def __init__(self, line: str, code: int):
        super().__init__(line)
        self.code = code


@dataclass
class StopRequest:
    signal: signal.Signals | None = None  # the signal received, once one was
    asked: Callable[[], int] | None = None  # a stop asked from outside (a Ray run's driver): its signal, 0 for none

    def pending(self) -> int:
        """The signal number of a stop wanted now (this process's own, or one asked from outside), 0 for none."""
        if self.signal is None and self.asked is not None:
            return self.asked()
        return int(self.signal or 0)

    def agree(self, signum: int) -> None:
        """Under torch.distributed every rank stops after the step whose all-reduce carried a request."""
        if signum and self.signal is None:
            self.signal = signal.Signals(signum)

    def stop(self, step: int, checkpoint) -> None:
        """Raise Interrupted, naming the step and its checkpoint, if a signal came."""
        if self.signal is not None:
            raise Interrupted(f"{self.signal.name} after step {step}; checkpoint {checkpoint}; continue with --resume",
                              128 + int(self.signal))


@contextmanager
def stop_requests(asked: Callable[[], int] | None = None) -> Iterator[StopRequest]:
    request = StopRequest(asked=asked)
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield request
        return
    before = {s: signal.getsignal(s) for s in SIGNALS}

    def restore() -> None:
        for s, handler in before.items():
            signal.signal(s, handler)

    def received(signum, frame) -> None:
        request.signal = signal.Signals(signum)
        restore()  # a second one acts at once
        past = "\n" if sys.stderr.isatty() else ""  # the terminal's ^C, a progress bar's line; a log has neither
        print(f"{past}shortft: {request.signal.name}: stopping after this step, with a checkpoint (again to stop now)",
              file=sys.stderr, flush=True)

    for s in SIGNALS:
        signal.signal(s, received)
    try:
        yield request
    finally:
        restore()
