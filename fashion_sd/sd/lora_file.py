"""A LoRA checkpoint file (``.lora.safetensors``): the one owner of the format for preflight
checks, training, inference and interop (the safetensors format under it is
:mod:`fashion_sd.safetensors_file`'s).

- :func:`check`: the one validator of a LoRA file: format, metadata, every layer's shapes
  against Stable Diffusion 1.x (:func:`expected_kernel_shapes`, the layer table, no model
  built) and its values (a NaN would turn every image black);
- :func:`read` / :func:`write`: its tensors and metadata as numpy arrays and strings.

Per layer: ``LAYER.lora_a`` (in, r) and ``LAYER.lora_b`` (r, out); a DoRA (metadata ``type:
dora``) also ``LAYER.dora_m`` (out,), its magnitude per output channel. Metadata: ``rank``,
``alpha``, ``targets``, ``type`` (absent in files from before DoRA: ``lora``).

numpy and the standard library only: a bad LoRA flag costs milliseconds, never TensorFlow.
Layer names follow :mod:`fashion_sd.sd.lora`: ``st{i:02d}.attn{1,2}.{to_q,to_k,to_v,out_proj}`` for
the i-th SpatialTransformer of KerasCV's ``DiffusionModel`` (in its layer order) and
``te{i:02d}.{proj}`` for the CLIP text encoder; ``tests/sd/test_unet_slow.py`` checks the table
against the real model.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from functools import cache
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fashion_sd.errors import FashionSDError
from fashion_sd.files import atomic_path
from fashion_sd.safetensors_file import (
    FLOAT_DTYPES,
    decode,
    nonfinite_tensors,
    safetensors_header,
)

FORMAT = "fashion-sd-lora"
FORMAT_VERSION = "1"
TYPES = ("lora", "dora")


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


PROJECTIONS = ("to_q", "to_k", "to_v", "out_proj")  # the U-Net attention's


def matches(name: str, target: str) -> bool:
    """``lora.targets`` entry ``target`` names layer ``name`` (matched at a dot boundary)."""
    return name == target or name.endswith("." + target)


def check_targets(names, targets) -> None:
    """Every ``lora.targets`` entry names one of ``names``; the static table of SD 1.x's U-Net
    projections by default, so a typo is named before any model is built (or Keras loaded)."""
    names = list(names)
    unmatched = [t for t in targets if not any(matches(k, t) for k in names)]
    if unmatched:
        examples = ", ".join(list(PROJECTIONS) + ["attn1.to_q", "attn2.to_k", "st00.attn1.to_v"])
        raise LoraError(f"lora.targets: {', '.join(map(repr, unmatched))} match no attention "
                        f"projection; use names such as {examples}")


def unet_layer_names() -> list[str]:
    return [k for k in expected_kernel_shapes() if not is_text_encoder_layer(k)]


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
    dora = lora_type(name, p, meta) == "dora"
    suffixes = (".lora_a", ".lora_b", ".dora_m") if dora else (".lora_a", ".lora_b")
    for key, entry in sorted(tensors.items()):
        if key.endswith(".dora_m") and not dora:
            raise LoraError(f"{name} {p}: holds DoRA's magnitude {key!r} but its metadata says "
                            f"type {meta.get('type', 'lora')!r}, not 'dora' (corrupt file)")
        if not key.endswith(suffixes):
            raise LoraError(f"{name} {p}: holds tensor {key!r}; a fashion-sd LoRA holds only "
                            "LAYER.lora_a and LAYER.lora_b (and a DoRA LAYER.dora_m; corrupt, "
                            "or another format: import it with `fashion-sd convert import-lora`)")
        if entry["dtype"] not in FLOAT_DTYPES:
            raise LoraError(f"{name} {p}: {key} holds {entry['dtype']} numbers; a LoRA's "
                            f"matrices are floats ({', '.join(FLOAT_DTYPES)})")
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
        m = tensors.get(f"{layer}.dora_m")
        if dora and (m is None or tuple(m["shape"]) != (fan_out,)):
            raise LoraError(f"{name} {p}: DoRA layer {layer} needs dora_m of shape ({fan_out},), "
                            f"it has {'none' if m is None else tuple(m['shape'])} (corrupt file)")
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


def lora_type(name: str, p: Path, meta: dict[str, str]) -> str:
    """The file's ``type``: ``lora`` (also when absent: files from before DoRA) or ``dora``."""
    kind = meta.get("type", "lora")
    if kind not in TYPES:
        raise LoraError(f"{name} {p}: metadata type {kind[:40]!r} is neither of "
                        f"{', '.join(TYPES)} (corrupt file, or a newer fashion-sd's)")
    return kind


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
        entries, _ = safetensors_header(path)
        if any(e["dtype"] == "BF16" for e in entries.values()):
            return _widened(path, entries), meta
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoraError(f"{name} {path}: not a readable safetensors file ({exc})") from None


def _widened(path, entries: dict[str, dict]) -> dict[str, np.ndarray]:
    """Every tensor of a file that holds bfloat16 ones (PyTorch-made LoRAs often do), those
    widened to float32 (:func:`fashion_sd.safetensors_file.decode`)."""
    with Path(path).open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        (n,) = struct.unpack("<Q", data[:8])
        return {key: decode(data, 8 + n, e) for key, e in entries.items()}


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


def check_init_from(path, rank: int, alpha: float, lora_type: str | None = None) -> dict[str, str]:
    """Why ``lora.init_from`` cannot start a run of ``rank`` and ``alpha`` (and ``lora_type``,
    when given), as a LoraError; else the file's metadata. Rank and alpha must be the run's own,
    or training would continue a different function than the file describes; text-encoder
    layers cannot be trained here. A DoRA run may start from a plain LoRA (its magnitude then
    starts where that LoRA is), a LoRA run not from a DoRA."""
    meta = check(path, "lora.init_from", unet_only=True, fits_model=False)
    if lora_type == "lora" and meta.get("type") == "dora":
        raise LoraError(f"lora.init_from: {path} is a DoRA, the run has lora.type lora; set "
                        "lora.type: dora")
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
