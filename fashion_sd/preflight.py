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


# ---- a run folder to resume


def resume_config(root) -> None:
    """``--resume`` compares the run's own ``config.yaml`` with this config: it must be there,
    be YAML and be a mapping, or the comparison would end in a traceback. Only checked when the
    train state is there and readable (otherwise the run's own check says "nothing to resume"
    or "damaged", with its advice); a remote output.dir is checked once its mirror is pulled."""
    from fashion_sd import remote
    from fashion_sd.config import read_yaml_mapping
    from fashion_sd.rundir import RunDir

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


# Bytes per element of each safetensors dtype (the format's own list); a tensor's data_offsets
# must span exactly prod(shape) of them.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
                "F8_E8M0": 1, "C64": 8}
# Float dtypes whose values a LoRA check reads (numpy's view of each; BF16 is widened).
_FLOAT_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def safetensors_header(path) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries (``dtype``, ``shape``, ``data_offsets``) and the ``__metadata__`` of a
    safetensors file, from its header only; the one reader of the format's header.

    Checks what a reader would trip on later, as the format's own reader does: the header's
    length and JSON (a header nested too deeply for any reader is refused, not a RecursionError),
    ``__metadata__`` a mapping of strings, each entry, every tensor's bytes the size its dtype and
    shape say, the tensors' data one after another with no overlap and no gap, and all of it
    inside the file (a truncated copy fails here, not mid-run).
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
        except RecursionError:
            raise ValueError("its safetensors header is nested too deeply to read (corrupt or "
                             "crafted file)") from None
    if not isinstance(header, dict):
        raise ValueError("its safetensors header is not a mapping (corrupt file)")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ValueError(f"its __metadata__ is a {type(meta).__name__}, not a mapping of "
                         "strings (corrupt file)")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise ValueError(f"its __metadata__ value of {k!r} is a {type(v).__name__}, not a "
                             "string (corrupt file)")
    spans = []
    for key, info in header.items():
        try:
            begin, stop = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
            if not (isinstance(dtype, str) and isinstance(shape, list)
                    and all(type(d) is int and d >= 0 for d in (*shape, begin, stop))):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {key!r} has a malformed header entry (corrupt file)") from None
        if stop < begin:
            raise ValueError(f"tensor {key!r} has data_offsets [{begin}, {stop}] that run "
                             "backwards (corrupt file)")
        if dtype in _DTYPE_BYTES and stop - begin != _DTYPE_BYTES[dtype] * math.prod(shape):
            raise ValueError(f"tensor {key!r} ({dtype} {shape}) needs "
                             f"{_DTYPE_BYTES[dtype] * math.prod(shape)} bytes, its data_offsets "
                             f"span {stop - begin} (corrupt file)")
        spans.append((begin, stop, key))
    end, previous = 0, None
    for begin, stop, key in sorted(spans):
        if begin < end:
            raise ValueError(f"tensors {previous!r} and {key!r} overlap (data_offsets up to "
                             f"{end} and from {begin}; corrupt file)")
        if begin > end:
            raise ValueError(f"{begin - end} bytes belong to no tensor before {key!r} "
                             f"(data_offsets from {begin}, the previous tensor ends at {end}; "
                             "corrupt file)")
        end, previous = stop, key
    if 8 + n + end > size:
        raise ValueError(f"the header describes {8 + n + end} bytes, the file has {size} "
                         "(truncated: copy or download it again)")
    if 8 + n + end < size:
        raise ValueError(f"{size - 8 - n - end} bytes after the last tensor's data that the "
                         "header does not describe (corrupt file, or two files joined)")
    return header, dict(meta)


def nonfinite_tensors(path, entries: dict[str, dict]) -> list[str]:
    """``name: 2 NaN, 1 Inf`` for each float tensor of a safetensors file (header already read by
    :func:`safetensors_header`) holding a value that is not finite. Reads the values, memory
    mapped: meant for LoRA files (a few MB), where a NaN turns every image black."""
    import numpy as np

    p = Path(path)
    with p.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    base = 8 + n
    bad = []
    if not any(e["dtype"] in _FLOAT_DTYPES and e["data_offsets"][1] > e["data_offsets"][0]
               for e in entries.values()):
        return bad
    data = np.memmap(p, dtype=np.uint8, mode="r")
    try:
        for key, e in sorted(entries.items()):
            kind = _FLOAT_DTYPES.get(e["dtype"])
            begin, stop = e["data_offsets"]
            if kind is None or stop == begin:
                continue
            values = data[base + begin: base + stop].view(kind)
            if e["dtype"] == "BF16":
                values = (values.astype(np.uint32) << 16).view(np.float32)
            finite = np.isfinite(values)
            if not finite.all():
                nan = int(np.isnan(values).sum())
                inf = int((~finite).sum()) - nan
                bad.append(f"{key}: " + ", ".join(
                    f"{c} {w}" for c, w in ((nan, "NaN"), (inf, "Inf")) if c))
    finally:
        del data
    return bad


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
    rank = _lora_meta(name, p, meta)
    if rank != ranks and "layer_alpha" not in meta:
        raise InputError(f"{name} {p}: metadata says rank {meta['rank']}, its tensors have rank "
                         f"{', '.join(map(str, sorted(ranks)))} (corrupt file)")
    if bad := nonfinite_tensors(p, tensors):
        raise InputError(f"{name} {p}: {len(bad)} tensor(s) hold values that are not finite "
                         f"({'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''}): every image "
                         "would come out black. The training diverged before this checkpoint "
                         "was written; use an earlier one")
    return meta


def _lora_meta(name: str, p: Path, meta: dict[str, str]) -> set[int]:
    """The metadata every reader of a LoRA file uses: ``rank`` a whole number >= 1, ``alpha``
    (and each ``layer_alpha``) a finite number, ``targets`` a JSON list of names. Returns
    {rank}."""
    missing = [k for k in ("rank", "alpha", "targets") if k not in meta]
    if missing:
        raise InputError(f"{name} {p}: its metadata lacks {', '.join(missing)} (corrupt file, "
                         "or not written by fashion-sd); import it again with `fashion-sd "
                         "convert import-lora`")

    def finite(key: str, text) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise InputError(f"{name} {p}: metadata {key} {text!r} is not a finite number "
                             "(corrupt file)")
        return value

    rank = finite("rank", meta["rank"])
    if rank < 1 or rank != int(rank):
        raise InputError(f"{name} {p}: metadata rank {meta['rank']!r} is not a whole number "
                         ">= 1 (corrupt file)")
    finite("alpha", meta["alpha"])
    for key in ("targets", "layer_alpha"):
        if key not in meta:
            continue
        try:
            value = json.loads(meta[key])
        except (json.JSONDecodeError, RecursionError):
            raise InputError(f"{name} {p}: metadata {key} {meta[key][:60]!r} is not JSON "
                             "(corrupt file)") from None
        if key == "targets" and not (isinstance(value, list)
                                     and all(isinstance(t, str) for t in value)):
            raise InputError(f"{name} {p}: metadata targets {meta[key][:60]!r} is not a JSON "
                             "list of layer names (corrupt file)")
        if key == "layer_alpha":
            if not isinstance(value, dict):
                raise InputError(f"{name} {p}: metadata layer_alpha is not a JSON mapping of "
                                 "layer to alpha (corrupt file)")
            for layer, alpha in value.items():
                finite(f"layer_alpha of {layer}", alpha if not isinstance(alpha, bool) else None)
    return {int(rank)}


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
