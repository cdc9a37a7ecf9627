"""A stop request from SIGTERM or SIGINT during training: the run finishes its step, writes its
train state and exits with 128 + the signal; a second signal stops at once.

NOTE: reconstructed from its callers (run.py, callbacks.py) after the original file was
overwritten by mistake by another session (issue 25's Ctrl-C work); its author should check it.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Set by the first SIGTERM / SIGINT; the training loop polls ``requested``."""

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

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            return
        raise KeyboardInterrupt  # a second signal: at once


@contextmanager
def stop_requests():
    """SIGTERM and SIGINT request a clean stop for the block (main thread only)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, stop._handle) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
