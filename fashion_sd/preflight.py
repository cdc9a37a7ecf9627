"""Checks every command runs before it builds a model or opens an image: numbers in range and
finite, input files readable and of the right kind, output paths writable, a port free.

Pure Python plus the safetensors header format (no TensorFlow, no tensors loaded), so a bad
flag costs milliseconds, not the minutes of building the 860M-parameter U-Net. Each check
raises :class:`InputError`, whose message names the flag, key or file and the fix; every
command turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import tempfile
from pathlib import Path

from fashion_sd import remote
from fashion_sd.config import read_yaml_mapping
from fashion_sd.errors import FashionSDError
from fashion_sd.rundir import RunDir
from fashion_sd.safetensors_file import safetensors_header


class InputError(FashionSDError, ValueError):
    """A flag, config value or file a command cannot use; the message says how to fix it."""


# ---- numbers


def number(name: str, value, *, low=None, high=None, low_open: bool = False,
           integer: bool = False, hint: str = "") -> None:
    """``value`` is finite and within [low, high] (``low_open``: strictly above ``low``)."""
    if value is None:
        return
    bad = not math.isfinite(float(value))
    if not bad and low is not None:
        bad = value <= low if low_open else value < low
    if not bad and high is not None:
        bad = value > high
    if not bad and integer:
        bad = int(value) != value
    if bad:
        if low is not None and high is not None:
            need = f"a number from {low} to {high}"
        elif low is not None:
            need = f"a number {'>' if low_open else '>='} {low}"
        else:
            need = "a finite number"
        raise InputError(f"{name} {value}: must be {need}{hint}")


# ---- files in


def _path(name: str, path) -> Path:
    """``path`` as a Path whose every part fits the file system's name limit (255 bytes on
    Linux): a longer one made every later check an OSError (ENAMETOOLONG) with no flag named."""
    p = Path(path)
    longest = max(p.parts, key=lambda part: len(os.fsencode(part)), default="")
    if len(os.fsencode(longest)) > 255:
        raise InputError(f"{name} {str(p)[:80]}...: its part {longest[:40]}... is "
                         f"{len(os.fsencode(longest))} bytes long, more than the 255 a file "
                         "name can have; give a shorter name")
    return p


def input_file(name: str, path, what: str = "file") -> Path:
    """An existing, readable regular file."""
    p = _path(name, path)
    if not p.exists():
        raise InputError(f"{name} {p}: {what} not found")
    if p.is_dir():
        raise InputError(f"{name} {p}: is a folder; give the {what} itself")
    if not os.access(p, os.R_OK):
        raise InputError(f"{name} {p}: not readable (check its permissions)")
    return p


def tensor_file(name: str, path, what: str = "tensor file") -> Path:
    """An existing safetensors file or PyTorch checkpoint, told from its first bytes, before
    torch (seconds to load) is asked to open a text file."""
    p = input_file(name, path, what)
    with p.open("rb") as fh:
        head = fh.read(9)
    safetensors = len(head) == 9 and head[8:9] == b"{"  # a u64 header length, then its JSON
    torch_zip = head[:4] == b"PK\x03\x04"  # torch.save's zip format
    pickle = head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5  # an older torch.save
    if not (safetensors or torch_zip or pickle):
        raise InputError(f"{name} {p}: not a tensor file: neither safetensors nor a PyTorch "
                         f"checkpoint (it begins {head[:8]!r}); give the {what} itself")
    return p


def input_folder(name: str, path, what: str = "folder") -> Path:
    p = _path(name, path)
    if not p.is_dir():
        raise InputError(f"{name} {p}: {what} not found" if not p.exists()
                         else f"{name} {p}: is a file; give a {what}")
    return p


def text_file(name: str, path, what: str = "text file") -> Path:
    """A readable UTF-8 text file (a CSV, YAML or prompts file, not an image or a zip)."""
    p = input_file(name, path, what)
    with p.open("rb") as fh:
        head = fh.read(65536)
    try:
        if b"\x00" in head:
            raise UnicodeDecodeError("utf-8", head, head.index(b"\x00"), head.index(b"\x00") + 1,
                                     "NUL byte")
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # a cut multi-byte character at the end is still text
            raise InputError(f"{name} {p}: not a UTF-8 text {what} (binary data at byte "
                             f"{exc.start}); give the {what} itself, saved as UTF-8") from None
    return p


# ---- files out


def _creatable_in(name: str, p: Path, folder: Path) -> None:
    """Something can be created in ``folder`` (or in its nearest existing parent, which the
    missing folders are made in). Probed by creating and removing a temporary file: permission
    bits say nothing on a read-only mount or for root."""
    base = folder
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise InputError(f"{name} {p}: {base} is a file, so nothing can be created below it; "
                         "give another path")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise InputError(f"{name} {p}: cannot write in {base} ({exc.strerror}); give a folder "
                         "you can write to") from None


def output_file(name: str, path) -> Path:
    """A file path that can be (re)written atomically: not a folder, its folder writable."""
    p = _path(name, path)
    if p.is_dir():
        raise InputError(f"{name} {p}: is a folder; give a file name inside it")
    _creatable_in(name, p, p.parent)
    return p


def output_folder(name: str, path) -> Path:
    """A folder that exists and is writable, or can be created (a URL: probed through
    ``tf.io.gfile``, see :mod:`fashion_sd.remote`)."""

    if remote.is_remote(path):
        mirror = remote.Mirror(path)
        try:
            mirror.check(name)
        except remote.RemoteError as exc:
            raise InputError(str(exc)) from None
        return mirror.local
    p = _path(name, path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{name} {p}: is a file; give a folder (it is created if missing)")
    _creatable_in(name, p, p)
    return p


# ---- a run folder to resume


def resume_config(root) -> None:
    """``--resume`` compares the run's own ``config.yaml`` with this config: it must be there,
    be YAML and be a mapping, or the comparison would end in a traceback. Only checked when the
    train state is there and readable (otherwise the run's own check says "nothing to resume"
    or "damaged", with its advice); a remote output.dir is checked once its mirror is pulled."""

    if remote.is_remote(root):
        return
    run = RunDir(root)
    try:
        safetensors_header(run.train_state)
    except (ValueError, OSError):
        return
    fix = (f"restore the run's config.yaml, or train from its checkpoint in a new run: "
           f"--set lora.init_from={run.last}, or start over with --fresh")
    if not run.config.is_file():
        what = "is a folder, not a file" if run.config.exists() else "not found"
        raise InputError(f"--resume: {run.config} {what}: --resume checks this config against "
                         f"the one the run was started with; {fix}")
    try:
        read_yaml_mapping(run.config, InputError, "the config.yaml the run wrote", "sections")
    except InputError as exc:
        raise InputError(f"--resume: {exc}; {fix}") from None


# ---- safetensors, read by header only


def readable_safetensors(name: str, path, what: str = "safetensors file"):
    p = input_file(name, path, what)
    try:
        return safetensors_header(p)
    except (ValueError, OSError) as exc:
        raise InputError(f"{name} {p}: not a readable safetensors file ({exc}); give a "
                         f"{what}") from None


# ---- the app's port


def port_free(host: str, port: int, flag: str = "--port") -> None:
    """Bind ``host:port`` once and let go, so a taken port is reported before the model loads."""
    number(flag, port, low=1, high=65535, integer=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise InputError(f"{flag} {port}: already in use on {host}; stop what holds it or "
                                 f"pick another port, e.g. {flag} {port + 1 if port < 65535 else 7860}") from None
            raise InputError(f"--host {host}: cannot listen there ({exc.strerror}); use "
                             "127.0.0.1, 0.0.0.0 or an address of this machine") from None
