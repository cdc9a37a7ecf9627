"""Writing files so that a crash or a bad input never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fashion_sd.errors import FashionSDError

# mkstemp makes 0600 files; outputs should get the permissions any other new file would.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    The rename is atomic on POSIX and Windows, so readers see the old file or the new one, never
    a mix; the temporary file sits in the same folder so the rename never crosses file systems.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # After the block: a writer may replace the file it was given by one of its own making
        # (safetensors' does, with mkstemp's 0600), so the mode is set on what was written.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as exc:
        written = _size(Path(tmp))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if is_disk_full(exc):
            raise DiskFull(path, max(written, _size(path))) from None
        raise


class DiskFull(FashionSDError, OSError):
    """A write that failed for space; the file it would have replaced is untouched."""

    def __init__(self, path: Path, needed: int):
        free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
        super().__init__(f"no space left on the device writing {path}: {human_size(free)} free in "
                         f"{path.parent}, and it needs about {human_size(needed)} more "
                         f"(the previous {path.name}, if any, is intact)")
        self.path, self.needed = path, needed


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, whether raised as an OSError or wrapped by a library (safetensors' Rust
    writer raises its own error whose message carries the OS error)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "StorageFull" in text or "os error 28" in text


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
