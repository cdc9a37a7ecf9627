"""A LoRA checkpoint file (``.lora.safetensors``) and the safetensors format under it: the one
owner of the format for preflight checks, training, inference and interop.

- :func:`safetensors_header`: the header of any safetensors file, checked as the format's own
  reader would (read without loading a tensor);
- :func:`check`: the one validator of a LoRA file: format, metadata, every layer's shapes
  against Stable Diffusion 1.x (:func:`expected_kernel_shapes`, the layer table, no model
  built) and its values (a NaN would turn every image black);
- :func:`read` / :func:`write`: its tensors and metadata as numpy arrays and strings.

numpy and the standard library only: a bad LoRA flag costs milliseconds, never TensorFlow.
Layer names follow :mod:`fashion_sd.sd.lora`: ``st{i:02d}.attn{1,2}.{to_q,to_k,to_v,out_proj}`` for
the i-th SpatialTransformer of KerasCV's ``DiffusionModel`` (in its layer order) and
``te{i:02d}.{proj}`` for the CLIP text encoder; ``tests/sd/test_unet_slow.py`` checks the table
against the real model.
"""

from __future__ import annotations

import json
import math
import struct
from functools import cache
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fashion_sd.errors import FashionSDError
from fashion_sd.files import atomic_path

FORMAT = "fashion-sd-lora"
FORMAT_VERSION = "1"
# The safetensors header is a little-endian u64 length, then that much JSON; the format caps it
# at 100 MB, so a larger value means the file is something else.
_MAX_HEADER = 100_000_000


class LoraError(FashionSDError, ValueError):
    """A LoRA file or setting that does not fit the model; the message says how."""


# --------------------------------------------------------------------------------------------
# Stable Diffusion 1.x's LoRA-able layers and their kernel shapes, without building a model

# Channels of the 16 SpatialTransformers in layer order: down 320 320 640 640 1280 1280,
# middle 1280, up 1280 x3, 640 x3, 320 x3.
TRANSFORMER_CHANNELS = (320, 320, 640, 640, 1280, 1280, 1280,
                        1280, 1280, 1280, 640, 640, 640, 320, 320, 320)
CONTEXT_DIM = 768  # CLIP ViT-L/14's hidden size: what cross-attention keys and values read
TEXT_LAYERS, TEXT_WIDTH, TEXT_MLP = 12, 768, 3072


@cache
def expected_kernel_shapes() -> dict[str, tuple[int, int]]:
    """``{layer name: (fan_in, fan_out)}`` of every Dense a LoRA may change in SD 1.x."""
    out: dict[str, tuple[int, int]] = {}
    for i, c in enumerate(TRANSFORMER_CHANNELS):
        for attn in ("attn1", "attn2"):
            kv_in = c if attn == "attn1" else CONTEXT_DIM
            out[f"st{i:02d}.{attn}.to_q"] = (c, c)
            out[f"st{i:02d}.{attn}.to_k"] = (kv_in, c)
            out[f"st{i:02d}.{attn}.to_v"] = (kv_in, c)
            out[f"st{i:02d}.{attn}.out_proj"] = (c, c)
    for i in range(TEXT_LAYERS):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"te{i:02d}.{proj}"] = (TEXT_WIDTH, TEXT_WIDTH)
        out[f"te{i:02d}.fc1"] = (TEXT_WIDTH, TEXT_MLP)
        out[f"te{i:02d}.fc2"] = (TEXT_MLP, TEXT_WIDTH)
    return out


def is_text_encoder_layer(key: str) -> bool:
    return key.startswith("te")


# --------------------------------------------------------------------------------------------
# The safetensors format

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


# --------------------------------------------------------------------------------------------
# A LoRA checkpoint

def check(path, name: str = "LoRA", *, unet_only: bool = False, fits_model: bool = True) -> dict[str, str]:
    """A fashion-sd LoRA checkpoint that fits Stable Diffusion 1.x: format, rank and every layer's
    A (in x r) and B (r x out) shape against the model's kernels, read from the header alone.
    ``fits_model=False`` checks only the file itself (a format conversion needs no model).
    Returns the file's metadata."""
    p = Path(path)
    if not p.is_file():
        raise LoraError(f"{name} {p}: LoRA checkpoint not found")
    try:
        tensors, meta = safetensors_header(p)
    except (ValueError, OSError) as exc:
        raise LoraError(f"{name} {p}: not a readable safetensors file ({exc}); give a LoRA "
                        "checkpoint") from None
    if meta.get("format") != FORMAT:
        raise LoraError(f"{name} {p}: not a fashion-sd LoRA checkpoint (format "
                         f"{meta.get('format')!r}); import a kohya or diffusers LoRA first with "
                         "`fashion-sd convert import-lora --from FILE --out X.lora.safetensors`")
    shapes = expected_kernel_shapes()
    layers = sorted({k.rsplit(".", 1)[0] for k in tensors})
    if not layers:
        raise LoraError(f"{name} {p}: holds no LoRA layers")
    ranks = set()
    te = [layer for layer in layers if is_text_encoder_layer(layer)]
    for layer in layers:
        if unet_only and te:
            raise LoraError(f"{name} {p}: has {len(te)} text-encoder layers (the first: text-encoder "
                            f"layer {te[0]}); training here trains "
                             "U-Net layers only. Start from a U-Net-only LoRA")
        if fits_model and layer not in shapes:
            raise LoraError(f"{name} {p}: layer {layer} is not in Stable Diffusion 1.x "
                             "(made for another model?); use a LoRA trained on SD 1.x")
        a, b = tensors.get(f"{layer}.lora_a"), tensors.get(f"{layer}.lora_b")
        if a is None or b is None:
            raise LoraError(f"{name} {p}: layer {layer} lacks its lora_a or lora_b tensor "
                             "(corrupt file)")
        a_shape, b_shape = tuple(a["shape"]), tuple(b["shape"])
        fan_in, fan_out = shapes[layer] if fits_model else (a_shape[0], b_shape[-1])
        if (len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != fan_in
                or b_shape[1] != fan_out or a_shape[1] != b_shape[0]):
            raise LoraError(
                f"{name} {p}: {layer} has A {a_shape} and B {b_shape}, Stable Diffusion 1.x "
                f"needs A ({fan_in}, r) and B (r, {fan_out}) (made for another model, e.g. "
                "SDXL or SD 2.x?); use a LoRA trained on SD 1.x")
        ranks.add(a_shape[1])
    rank = _lora_meta(name, p, meta)
    if rank != ranks and "layer_alpha" not in meta:
        raise LoraError(f"{name} {p}: metadata says rank {meta['rank']}, its tensors have rank "
                         f"{', '.join(map(str, sorted(ranks)))} (corrupt file)")
    if bad := nonfinite_tensors(p, tensors):
        raise LoraError(f"{name} {p}: {len(bad)} tensor(s) hold values that are not finite "
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
        raise LoraError(f"{name} {p}: its metadata lacks {', '.join(missing)} (corrupt file, "
                         "or not written by fashion-sd); import it again with `fashion-sd "
                         "convert import-lora`")

    def finite(key: str, text) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise LoraError(f"{name} {p}: metadata {key} {text!r} is not a finite number "
                             "(corrupt file)")
        return value

    rank = finite("rank", meta["rank"])
    if rank < 1 or rank != int(rank):
        raise LoraError(f"{name} {p}: metadata rank {meta['rank']!r} is not a whole number "
                         ">= 1 (corrupt file)")
    finite("alpha", meta["alpha"])
    for key in ("targets", "layer_alpha"):
        if key not in meta:
            continue
        try:
            value = json.loads(meta[key])
        except (json.JSONDecodeError, RecursionError):
            raise LoraError(f"{name} {p}: metadata {key} {meta[key][:60]!r} is not JSON "
                             "(corrupt file)") from None
        if key == "targets" and not (isinstance(value, list)
                                     and all(isinstance(t, str) for t in value)):
            raise LoraError(f"{name} {p}: metadata targets {meta[key][:60]!r} is not a JSON "
                             "list of layer names (corrupt file)")
        if key == "layer_alpha":
            if not isinstance(value, dict):
                raise LoraError(f"{name} {p}: metadata layer_alpha is not a JSON mapping of "
                                 "layer to alpha (corrupt file)")
            for layer, alpha in value.items():
                finite(f"layer_alpha of {layer}", alpha if not isinstance(alpha, bool) else None)
    return {int(rank)}


def read(path, name: str = "LoRA", *, fits_model: bool = False,
         **check_args) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of a LoRA checkpoint, after :func:`check` (of the file itself;
    ``fits_model`` also against Stable Diffusion 1.x's shapes)."""

    meta = check(path, name, fits_model=fits_model, **check_args)
    try:
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError(f"{name} {path}: not a readable safetensors file ({exc})") from None


def write(path, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> Path:
    """A LoRA checkpoint, atomically; ``meta`` gains the format's name and version."""

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "format_version": FORMAT_VERSION,
                                               **meta})
    return Path(path)


def layer_scale(meta: dict[str, str], key: str, rank: int) -> float:
    """alpha / rank of one layer: the file's alpha, or its per-layer alpha where they differ."""
    return layer_alpha(meta, key) / rank


def layer_alpha(meta: dict[str, str], key: str) -> float:
    per_layer = json.loads(meta["layer_alpha"]) if "layer_alpha" in meta else {}
    return float(per_layer.get(key, meta["alpha"]))


def check_init_from(path, rank: int, alpha: float) -> dict[str, str]:
    """Why ``lora.init_from`` cannot start a run of ``rank`` and ``alpha``, as a LoraError;
    else the file's metadata. Rank and alpha must be the run's own, or training would continue
    a different function than the file describes; text-encoder layers cannot be trained here."""
    meta = check(path, "lora.init_from", unet_only=True, fits_model=False)
    tensors, _ = safetensors_header(path)
    ranks = {int(v["shape"][1]) for k, v in tensors.items() if k.endswith(".lora_a")}
    if ranks != {rank}:
        raise LoraError(f"lora.init_from: {path} has rank {', '.join(map(str, sorted(ranks)))}, "
                        f"the run has lora.rank {rank}; set lora.rank: {int(meta['rank'])}")
    if "layer_alpha" in meta or not math.isclose(float(meta["alpha"]), alpha, rel_tol=1e-5):
        raise LoraError(f"lora.init_from: {path} has alpha {meta['alpha']}"
                        + (" (differing per layer)" if "layer_alpha" in meta else "")
                        + f", the run has lora.alpha {alpha}; set lora.alpha: {float(meta['alpha'])}")
    return meta
