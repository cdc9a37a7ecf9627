"""Base-model weights in and out of KerasCV's files: import an SD 1.x model, fold a LoRA in.

Example:
    >>> summary = import_model("models/sd15", "weights/sd15")   # a diffusers folder
    >>> summary["absent"]
    []

then ``model.weights: local:weights/sd15`` uses them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fashion_sd.files import atomic_write_text
from fashion_sd.interop import kerascv
from fashion_sd.interop.checkpoint import open_source
from fashion_sd.interop.tensors import InteropError, sha256
from fashion_sd.sd import lora, lora_file, models

log = logging.getLogger(__name__)

BUILD_RESOLUTION = 64  # the weights do not depend on the size a component is built for


def save_weights(model, path: Path) -> Path:
    """``model.save_weights`` atomically (Keras insists on the ``.weights.h5`` suffix)."""
    tmp = path.with_name(".tmp-" + path.name)
    model.save_weights(str(tmp))
    tmp.replace(path)
    return path


def import_model(path: str | Path, out: str | Path, ema: bool = False, built: dict | None = None,
                 hash_files: bool = True) -> dict:
    """Convert a diffusers folder or a CompVis single file into KerasCV weight files in ``out``.

    Writes ``<KerasCV name>.weights.h5`` for each component the source has, and ``source.json``
    (origin, sha256 of the source files, components written, components absent). Every source
    tensor is used exactly once or is a listed non-weight; otherwise nothing is written.
    ``built`` may hold KerasCV components already built (by name) to fill instead of building new
    ones (a U-Net takes about 40 s to build on a CPU). Returns the summary written to source.json.
    """
    src = open_source(path, ema)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InteropError(f"{out}: exists and is not a folder")
    present = [c for c in models.COMPONENTS if c in src.parts]
    absent = [c for c in models.COMPONENTS if c not in src.parts]
    built = {**{n: models.build_component(n, BUILD_RESOLUTION) for n in present
                if n not in (built or {})}, **(built or {})}
    targets = {n: kerascv.TARGETS[n](built[n]) for n in present}
    for name in present:  # every component checked before any file is written
        kerascv.check(targets[name], src.parts[name], f"{src.path} ({name})")
    written, dtypes = {}, {}
    for name in present:
        part = src.parts[name]
        kerascv.assign(targets[name], part, f"{src.path} ({name})")
        out.mkdir(parents=True, exist_ok=True)
        target = out / models.WEIGHT_FILES[name].keras3_name
        save_weights(built[name], target)
        log.info("%s -> %s", name, target)
        written[name] = target.name
        dtypes[name] = sorted(part.dtypes())
    del built, targets
    summary = {
        "origin": {"kind": "imported", "path": str(Path(path).resolve()), "layout": src.layout,
                   "ema": ema,
                   "sha256": {str(f.relative_to(src.path) if src.layout == "diffusers" else f.name):
                              sha256(f) if hash_files else None for f in src.files}},
        "components": written, "absent": absent, "source_dtypes": dtypes,
        "skipped": {why: len(names) for why, names in src.skipped.items()},
    }
    atomic_write_text(out / "source.json", json.dumps(summary, indent=2) + "\n")
    return summary


def merge_model(weights: str, lora_path: str | Path, out: str | Path, strength: float = 1.0,
                cache_dir: str | None = None, built: dict | None = None) -> dict:
    """Base weights (``model.weights`` syntax) with a LoRA folded in, as KerasCV files in ``out``.

    The U-Net (and the text encoder, when the LoRA has parts for it) get
    ``W + strength * alpha / rank * A @ B``; the VAE is copied as it is. Generation from ``out``
    then needs no LoRA step. ``built`` as in :func:`import_model`: components to load the base
    weights into instead of building new ones (they hold the merged weights afterwards).
    """

    tensors, meta = lora_file.read(lora_path, fits_model=False)  # checked before anything is built
    source = models.resolve_weights(weights, cache_dir=cache_dir)
    if source.is_random:
        raise InteropError("merge: --weights random has nothing to merge into; give local:DIR or "
                           "pretrained")
    if built:
        for name, model in built.items():
            model.load_weights(str(source.files[name]))
        rest = [c for c in models.COMPONENTS if c not in built]
        comps = models.build_components(source, BUILD_RESOLUTION, rest)
        for name, model in built.items():
            setattr(comps, name, model)
    else:
        comps = models.build_components(source, BUILD_RESOLUTION)
    lora.merge_lora(comps.diffusion_model, lora_path, strength, text_encoder=comps.text_encoder)
    models.save_components(comps, out)
    record = json.loads((Path(out) / "source.json").read_text())
    record["merged_lora"] = {"path": str(Path(lora_path).resolve()), "strength": strength,
                             "sha256": sha256(lora_path), "rank": meta.get("rank"),
                             "alpha": meta.get("alpha"), "tensors": len(tensors)}
    atomic_write_text(Path(out) / "source.json", json.dumps(record, indent=2) + "\n")
    return record
