"""SIGINT (Ctrl-C) and SIGTERM (``kill``, a preempted VM) stop a sweep process, the workers
launcher or the app at once, whatever its threads are doing, with a message and exit code 128 +
the signal: 130 for SIGINT, 143 for SIGTERM (the shell's convention).

The handlers are installed explicitly rather than left to Python's default: a process started
with SIGINT ignored (every background job of a non-interactive shell, e.g. a script's
``python scripts/sweep.py ... &``, or a CI runner's) inherits that, and Python then never raises
KeyboardInterrupt: the distributed chief that printed "stop this chief (Ctrl-C)" went on waiting
(issue 25). SIGTERM's default kills without a word or a table.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def handling(handle):
    """``handle(signum, frame)`` for SIGINT and SIGTERM during the block, the previous handlers
    back after it. Main thread only: Python runs handlers there; elsewhere (a test calling a
    command's main from a thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Stopped(KeyboardInterrupt):
    """Raised in the main thread by SIGINT or SIGTERM.

    A KeyboardInterrupt, not an Exception: KerasTuner's ``except Exception`` around a trial and
    gRPC's blocking calls let it through, and Gradio's wait (``block_thread``) treats it as Ctrl-C.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Signals:
    """What a stop signal does in this process, by what its main thread is doing.

    - running child processes (:meth:`wait`): the first signal is passed on to them (a training
      run saves its state and stops) and this process stops after them; a second kills them;
    - in a waiting loop that polls :attr:`received` (:meth:`deferred`): the signal is only
      recorded, so it can never land inside a lock the loop holds (KerasTuner's oracle lock is
      not released by an exception); a second signal raises at once;
    - otherwise: :class:`Stopped` is raised at once.
    """

    def __init__(self):
        self.received: list[int] = []
        self.children: list[subprocess.Popen] = []
        self._deferred = False

    def _handle(self, signum, frame):
        self.received.append(signum)
        alive = [c for c in self.children if c.poll() is None]
        if alive:
            for child in alive:
                child.send_signal(signum) if len(self.received) == 1 else child.kill()
            return
        if self._deferred and len(self.received) == 1:
            return
        raise Stopped(self.received[0])

    @contextmanager
    def installed(self):
        """SIGINT and SIGTERM handled by this object for the block (main thread only: Python
        runs handlers there; elsewhere, e.g. a test calling main(), nothing changes)."""
        self.received.clear()
        with handling(self._handle):
            yield self

    @contextmanager
    def deferred(self):
        self._deferred = True
        try:
            yield self
        finally:
            self._deferred = False

    def raise_if_stopped(self) -> None:
        if self.received:
            raise Stopped(self.received[0])

    @contextmanager
    def forwarding(self, procs: list[subprocess.Popen]):
        """While the block waits for child processes (started with ``start_new_session=True``,
        so a terminal's Ctrl-C reaches them once, from here, not twice), a signal goes to them;
        Stopped is raised after the block if one came. Interrupted without these handlers (a
        notebook's interrupt), the children are killed: they must not outlive the wait."""
        self.children = list(procs)
        try:
            yield
        except BaseException:
            for p in procs:
                p.kill()
            raise
        finally:
            self.children = []
        self.raise_if_stopped()

    def wait(self, procs: list[subprocess.Popen]) -> list[int]:
        """Wait for child processes to end, as :meth:`forwarding` says."""
        with self.forwarding(procs):
            return [p.wait() for p in procs]


SIGNALS = Signals()  # signal handlers are per process: one object
