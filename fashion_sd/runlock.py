"""One run per folder: a lock that a live run holds and a dead one leaves behind harmlessly.

The lock is an open file with an exclusive ``flock`` (:func:`fcntl.flock`): the kernel releases
it when its process ends, however it ends (killed, crashed, machine restarted), so a lock left by
a dead run is never mistaken for a live one. The file also records who holds it (pid, host,
command, start time), which is how a refusal names the other process and how a take-over says
whose lock it was. Like kohya's and diffusers' trainers we do not guess liveness from pids: the
kernel knows. A remote ``output.dir`` (gs://...) is worked on in a local mirror; the mirror's
folder is locked, which guards this machine's runs (see ``docs/run-folder.md``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from fashion_sd.errors import FashionSDError

log = logging.getLogger(__name__)


class RunFolderBusy(FashionSDError, RuntimeError):
    """Another live process is running in the same output.dir."""


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:300],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (it wrote no details)"
    return (f"process {holder.get('pid')} on {holder.get('host')} (started "
            f"{holder.get('started')}: {holder.get('command')})")


class RunLock:
    """``with RunLock(path, folder):`` holds the run folder's lock for the block."""

    def __init__(self, path: str | Path, folder: str | Path):
        self.path, self.folder = Path(path), folder
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask, as any file
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunFolderBusy(
                f"output.dir {self.folder} is in use by {_describe(_read(self.path))}; one run per "
                f"folder: wait for it, stop it, or set output.dir to another folder") from None
        stale = _read(self.path)
        if stale:  # written by a run whose process is gone (the kernel freed its lock)
            log.warning("output.dir %s: taking over the lock of %s, which is no longer running",
                        self.folder, _describe(stale))
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(_holder()) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # Empty the file first: a holder recorded in a free lock would read as a dead run.
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
