"""A clean stop on SIGTERM / SIGINT during training: finish the step, save, say how to resume.

A preempted cloud VM or a Colab shutdown sends SIGTERM (then SIGKILL some seconds to minutes
later); Ctrl-C sends SIGINT. :func:`stop_requests` turns the first one into a request that the
training loop honours at the end of the current step (:class:`fashion_sd.training.callbacks.StepGuard`
stops there and the chief's Checkpointer writes the train state of that step); a second signal
stops the process at once, as a user pressing Ctrl-C twice expects. The exit code is the shell's
``128 + signal`` (130 for SIGINT, 143 for SIGTERM), so a scheduler sees an interrupted run, not
a failed one. Sweeps, the launcher and the app stop differently (at once): :mod:`fashion_sd.interrupt`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

from fashion_sd.interrupt import handling


class StopRequest:
    """Which signal asked the run to stop (None while none has); the step guard polls it."""

    def __init__(self):
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second signal: stop now, the way that signal would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after the current step and saving "
              "the train state (send it again to stop at once, without saving)", flush=True)


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """SIGTERM and SIGINT request a clean stop during the block (main thread only)."""
    request = StopRequest()
    with handling(request._handle):
        yield request
