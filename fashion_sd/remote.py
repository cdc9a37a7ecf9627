"""Paths that may live off this machine: ``gs://`` (Colab, TPUs), ``s3://``, ``hdfs://``, any URL
TensorFlow's file systems read, through ``tf.io.gfile``.

A run folder or an encoder cache on such a path is worked on in a local mirror (the cache is
memory-mapped and every output is written atomically by a rename, which need a local file
system) and each file is copied out as soon as it is written; a run that starts fills its mirror
from the remote folder first. So a Colab runtime that disconnects loses no encoded shard and no
checkpoint: a new runtime with ``--resume`` pulls them back and goes on. A mounted Google Drive
(``/content/drive/...``) is a local path and needs none of this.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path

from fashion_sd.errors import FashionSDError
from fashion_sd.files import atomic_path


class RemoteError(FashionSDError, OSError):
    """A remote path that cannot be read or written; the message names it."""


def is_remote(path) -> bool:
    return "://" in str(path)


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def join(base: str, *parts: str) -> str:
    """``base``/``parts`` for a URL or a local path (``Path`` would fold ``gs://`` into ``gs:/``)."""
    return posixpath.join(str(base), *parts) if is_remote(base) else str(Path(base, *parts))


def exists(path) -> bool:
    return _gfile().exists(str(path)) if is_remote(path) else Path(path).exists()


def is_file(path) -> bool:
    if is_remote(path):
        return _gfile().exists(str(path)) and not _gfile().isdir(str(path))
    return Path(path).is_file()


def open_file(path, mode: str = "rb"):
    """A file object for a local path or a URL."""
    return _gfile().GFile(str(path), mode) if is_remote(path) else open(path, mode)  # noqa: SIM115


def mirror_root() -> Path:
    """Where local mirrors live: ``$FASHION_SD_MIRROR``, else ``~/.cache/fashion-sd/mirror``."""
    return Path(os.environ.get("FASHION_SD_MIRROR")
                or Path.home() / ".cache" / "fashion-sd" / "mirror")


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # files.atomic_path's, mid-write


class Mirror:
    """A local folder that stands for the remote folder ``url``: :meth:`pull` copies in what
    the remote holds and the mirror lacks; :meth:`push` copies out what changed since the last
    push, each file to a temporary name and then renamed over its target, so a reader of the
    remote folder never sees half a file."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        digest = hashlib.sha1(self.url.encode()).hexdigest()[:12]
        self.local = mirror_root() / f"{posixpath.basename(self.url) or 'root'}-{digest}"
        self._pushed: dict[str, tuple[int, int]] = {}

    def check(self, what: str) -> None:
        """The remote folder can be made and written to (a probe file, then removed)."""
        gfile = _gfile()
        probe = join(self.url, ".fashion-sd-write-probe")
        try:
            gfile.makedirs(self.url)
            with gfile.GFile(probe, "w") as fh:
                fh.write("probe")
            gfile.remove(probe)
        except Exception as exc:  # noqa: BLE001 - every file system raises its own errors
            raise RemoteError(f"{what}: cannot write to {self.url} ({type(exc).__name__}: "
                              f"{str(exc).strip()[:200]}); check the URL and your credentials "
                              "(in Colab: google.colab.auth.authenticate_user())") from None

    def pull(self) -> int:
        """Copy in every remote file that the mirror lacks or holds at another size; the count."""
        gfile, copied = _gfile(), 0
        self.local.mkdir(parents=True, exist_ok=True)
        if not gfile.exists(self.url):
            return 0
        for folder, _, files in gfile.walk(self.url):
            rel = posixpath.relpath(folder, self.url)
            for name in files:
                if _is_temporary(name):
                    continue
                src, dst = join(folder, name), self.local / rel / name
                size = gfile.stat(src).length
                if dst.is_file() and dst.stat().st_size == size:
                    self._pushed[str(dst.relative_to(self.local))] = _stamp(dst)
                    continue
                with atomic_path(dst) as tmp:
                    gfile.copy(src, str(tmp), overwrite=True)
                self._pushed[str(dst.relative_to(self.local))] = _stamp(dst)
                copied += 1
        return copied

    def push(self, *_args, **_kwargs) -> int:
        """Copy out every mirror file written since the last push, and delete remotely what was
        deleted here (pruned checkpoints, ``--fresh``); the count of files copied. (Extra
        arguments are ignored, so it can be called back from any hook.)"""
        gfile, copied = _gfile(), 0
        for rel in [r for r in self._pushed if not (self.local / r).exists()]:
            target = join(self.url, *Path(rel).parts)
            if gfile.exists(target):
                gfile.remove(target)
            del self._pushed[rel]
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            if _is_temporary(path.name):  # a write in progress (files.atomic_path)
                continue
            rel = str(path.relative_to(self.local))
            stamp = _stamp(path)
            if self._pushed.get(rel) == stamp:
                continue
            target = join(self.url, *Path(rel).parts)
            tmp = join(posixpath.dirname(target), f".{path.name}.push.tmp")
            gfile.makedirs(posixpath.dirname(target))
            gfile.copy(str(path), tmp, overwrite=True)
            gfile.rename(tmp, target, overwrite=True)
            self._pushed[rel] = stamp
            copied += 1
        return copied



def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns
