"""Checks every command runs before it builds a model or opens an image: numbers in range and
finite, input files readable and of the right kind, output paths writable, a port free.

Pure Python plus the safetensors header format (no TensorFlow, no tensors loaded), so a bad
flag costs milliseconds, not the minutes of building the 860M-parameter U-Net. Each check
raises :class:`InputError`, whose message names the flag, key or file and the fix; every
command turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import struct
import tempfile
from pathlib import Path

from fashion_sd.errors import FashionSDError
from fashion_sd.unet_layout import expected_kernel_shapes

LORA_FORMAT = "fashion-sd-lora"
# The safetensors header is a little-endian u64 length, then that much JSON; the format caps it
# at 100 MB, so a larger value means the file is something else.
_MAX_HEADER = 100_000_000


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


def input_file(name: str, path, what: str = "file") -> Path:
    """An existing, readable regular file."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{name} {p}: {what} not found")
    if p.is_dir():
        raise InputError(f"{name} {p}: is a folder; give the {what} itself")
    if not os.access(p, os.R_OK):
        raise InputError(f"{name} {p}: not readable (check its permissions)")
    return p


def input_folder(name: str, path, what: str = "folder") -> Path:
    p = Path(path)
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
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{name} {p}: is a folder; give a file name inside it")
    _creatable_in(name, p, p.parent)
    return p


def output_folder(name: str, path) -> Path:
    """A folder that exists and is writable, or can be created (a URL: probed through
    ``tf.io.gfile``, see :mod:`fashion_sd.remote`)."""
    from fashion_sd import remote

    if remote.is_remote(path):
        mirror = remote.Mirror(path)
        try:
            mirror.check(name)
        except remote.RemoteError as exc:
            raise InputError(str(exc)) from None
        return mirror.local
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{name} {p}: is a file; give a folder (it is created if missing)")
    _creatable_in(name, p, p)
    return p


# ---- safetensors, read by header only


def safetensors_header(path) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries (``dtype``, ``shape``, ``data_offsets``) and the ``__metadata__`` of a
    safetensors file, from its header only; the one reader of the format's header.

    Checks what a reader would trip on later: the header's length and JSON, each entry, and that
    every tensor's bytes lie inside the file (a truncated copy fails here, not mid-run).
    Raises ``ValueError`` saying what is wrong; callers add the flag and the fix.
    """
    p = Path(path)
    size = p.stat().st_size
    with p.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError(f"{size} bytes, too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError("no safetensors header at its start (not a safetensors file)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("its safetensors header is not valid JSON (corrupt file)") from None
    if not isinstance(header, dict):
        raise ValueError("its safetensors header is not a mapping (corrupt file)")
    meta = header.pop("__metadata__", None) or {}
    end = 0
    for key, info in header.items():
        try:
            begin, stop = info["data_offsets"]
            str(info["dtype"]), [int(d) for d in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {key!r} has a malformed header entry (corrupt file)") from None
        end = max(end, int(stop))
    if 8 + n + end > size:
        raise ValueError(f"the header describes {8 + n + end} bytes, the file has {size} "
                         "(truncated: copy or download it again)")
    return header, {str(k): str(v) for k, v in meta.items()}


def readable_safetensors(name: str, path, what: str = "safetensors file"):
    p = input_file(name, path, what)
    try:
        return safetensors_header(p)
    except (ValueError, OSError) as exc:
        raise InputError(f"{name} {p}: not a readable safetensors file ({exc}); give a "
                         f"{what}") from None


def lora_file(name: str, path, *, unet_only: bool = False, fits_model: bool = True) -> dict[str, str]:
    """A fashion-sd LoRA checkpoint that fits Stable Diffusion 1.x: format, rank and every layer's
    A (in x r) and B (r x out) shape against the model's kernels, read from the header alone.
    ``fits_model=False`` checks only the file itself (a format conversion needs no model).
    Returns the file's metadata."""
    tensors, meta = readable_safetensors(name, path, "LoRA checkpoint")
    p = Path(path)
    if meta.get("format") != LORA_FORMAT:
        raise InputError(f"{name} {p}: not a fashion-sd LoRA checkpoint (format "
                         f"{meta.get('format')!r}); import a kohya or diffusers LoRA first with "
                         "`fashion-sd convert import-lora --from FILE --out X.lora.safetensors`")
    shapes = expected_kernel_shapes()
    layers = sorted({k.rsplit(".", 1)[0] for k in tensors})
    if not layers:
        raise InputError(f"{name} {p}: holds no LoRA layers")
    ranks = set()
    for layer in layers:
        if unet_only and layer.startswith("te"):
            raise InputError(f"{name} {p}: has text-encoder layer {layer}; training here trains "
                             "U-Net layers only. Start from a U-Net-only LoRA")
        if fits_model and layer not in shapes:
            raise InputError(f"{name} {p}: layer {layer} is not in Stable Diffusion 1.x "
                             "(made for another model?); use a LoRA trained on SD 1.x")
        a, b = tensors.get(f"{layer}.lora_a"), tensors.get(f"{layer}.lora_b")
        if a is None or b is None:
            raise InputError(f"{name} {p}: layer {layer} lacks its lora_a or lora_b tensor "
                             "(corrupt file)")
        a_shape, b_shape = tuple(a["shape"]), tuple(b["shape"])
        fan_in, fan_out = shapes[layer] if fits_model else (a_shape[0], b_shape[-1])
        if (len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != fan_in
                or b_shape[1] != fan_out or a_shape[1] != b_shape[0]):
            raise InputError(
                f"{name} {p}: {layer} has A {a_shape} and B {b_shape}, Stable Diffusion 1.x "
                f"needs A ({fan_in}, r) and B (r, {fan_out}) (made for another model, e.g. "
                "SDXL or SD 2.x?); use a LoRA trained on SD 1.x")
        ranks.add(a_shape[1])
    rank = meta.get("rank")
    if rank is not None and {int(float(rank))} != ranks and "layer_alpha" not in meta:
        raise InputError(f"{name} {p}: metadata says rank {rank}, its tensors have rank "
                         f"{', '.join(map(str, sorted(ranks)))} (corrupt file)")
    return meta


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
