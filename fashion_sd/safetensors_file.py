"""The safetensors format itself, below every stage: a file's header read and checked as the
format's own reader would (no tensor loaded), its float values checked for NaN and Inf, and
bfloat16 widened for NumPy. numpy and the standard library only: preflight checks call it before
anything heavy loads.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

# The safetensors header is a little-endian u64 length, then that much JSON; the format caps it
# at 100 MB, so a larger value means the file is something else.
_MAX_HEADER = 100_000_000
# Bytes per element of each safetensors dtype (the format's own list); a tensor's data_offsets
# must span exactly prod(shape) of them.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
                "F8_E8M0": 1, "C64": 8}
# Float dtypes whose values a LoRA check reads (numpy's view of each; BF16 is widened).
FLOAT_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


# NumPy's dtype for each safetensors dtype :func:`decode` reads (bfloat16 as its bits, widened).
NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
                "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                "BOOL": np.bool_}


def decode(buffer, base: int, entry: dict) -> np.ndarray:
    """One tensor's values, a copy: ``entry`` from :func:`safetensors_header`, ``buffer`` the
    whole file's bytes (an mmap), ``base`` 8 plus the header's length. bfloat16 comes back as
    float32; a dtype outside :data:`NUMPY_DTYPES` is a KeyError."""
    dtype = NUMPY_DTYPES[entry["dtype"]]
    start, end = entry["data_offsets"]
    raw = np.frombuffer(buffer, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize,
                        offset=base + start)
    if entry["dtype"] == "BF16":
        raw = bf16_to_float32(raw)
    return raw.reshape(entry["shape"]).copy()


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 numbers (their uint16 bit patterns) as float32, exactly: a bfloat16 is the upper
    half of a float32. NumPy has no bfloat16, so ``safetensors.numpy`` refuses such files."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


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
    p = Path(path)
    with p.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
    base = 8 + n
    bad = []
    if not any(e["dtype"] in FLOAT_DTYPES and e["data_offsets"][1] > e["data_offsets"][0]
               for e in entries.values()):
        return bad
    data = np.memmap(p, dtype=np.uint8, mode="r")
    try:
        for key, e in sorted(entries.items()):
            kind = FLOAT_DTYPES.get(e["dtype"])
            begin, stop = e["data_offsets"]
            if kind is None or stop == begin:
                continue
            values = data[base + begin: base + stop].view(kind)
            if e["dtype"] == "BF16":
                values = bf16_to_float32(values)
            finite = np.isfinite(values)
            if not finite.all():
                nan = int(np.isnan(values).sum())
                inf = int((~finite).sum()) - nan
                bad.append(f"{key}: " + ", ".join(
                    f"{c} {w}" for c, w in ((nan, "NaN"), (inf, "Inf")) if c))
    finally:
        del data
    return bad


