"""Stable Diffusion v1.4's components, and where their weights come from.

``model.weights`` says where:

- ``pretrained``: KerasCV's published v1.4 files, downloaded once and cached by
  ``keras.utils.get_file`` with their sha256 (the same cache KerasCV itself uses, so a file already
  fetched by KerasCV is reused). Offline without a cache: an error at start that says what to do.
- ``local:DIR``: the same files from a folder, either KerasCV's published ``.h5`` names or their
  Keras 3 ``.weights.h5`` form (what :func:`save_components` writes).
- ``random``: untrained weights, for tests and plumbing checks; every output says so.
- ``auto`` (demo only): pretrained when cached or downloadable, else random with a loud warning.

The networks are the project's own Keras 3 code (:mod:`~fashion_sd.sd.unet`,
:mod:`~fashion_sd.sd.text_encoder`, :mod:`~fashion_sd.sd.vae`), one implementation for every
Keras backend, laid out as KerasCV's ``DiffusionModel``, ``TextEncoder``, ``ImageEncoder`` and
``Decoder`` so that KerasCV's published files load into them unchanged.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras

from fashion_sd.files import atomic_write_text
from fashion_sd.images import image_size, valid_size
from fashion_sd.sd.text_encoder import TextEncoder
from fashion_sd.sd.tokenizer import MAX_LENGTH, clip_tokenizer
from fashion_sd.sd.unet import DiffusionModel
from fashion_sd.sd.vae import Decoder, ImageEncoder
from fashion_sd.sd.weight_files import (
    COMPONENTS,
    PRETRAINED_ID,
    WEIGHT_FILES,
    WeightFile,
    WeightsError,
    WeightsSource,
    fetch_pretrained,
    find_local,
    fingerprint,
    resolve_weights,
)

# The weights are found by sd/weight_files.py, without Keras; models.X stays their address.
__all__ = ["Components", "build_component", "build_components", "save_components",
           "COMPONENTS", "PRETRAINED_ID", "WEIGHT_FILES", "WeightFile", "WeightsError",
           "WeightsSource", "fetch_pretrained", "find_local", "fingerprint", "resolve_weights"]

log = logging.getLogger(__name__)

# At 64 px the U-Net's innermost self-attention sees one token (a 1x1 latent) and Keras warns
# that its softmax is constant: expected there, and noise in every log otherwise.
warnings.filterwarnings("ignore", message="You are using a softmax over axis -1",
                        category=UserWarning)


# --------------------------------------------------------------------------------------------


@dataclass
class Components:
    """The parts of Stable Diffusion a job needs; the others stay None (they cost memory)."""

    source: WeightsSource
    resolution: int | list[int]  # pixels: a square, or [width, height]
    diffusion_model: keras.Model | None = None
    text_encoder: keras.Model | None = None
    image_encoder: keras.Model | None = None
    decoder: keras.Model | None = None

    @property
    def tokenizer(self):
        return clip_tokenizer()


def build_component(name: str, resolution: int, path: Path | None = None,
                    attention: str = "fused") -> keras.Model:
    """One component, with weights from ``path`` or left at random init.

    The U-Net computes its attention as ``attention`` says (:mod:`fashion_sd.sd.attention`):
    ``fused`` (default) or written out as KerasCV did; the weights are the same either way.
    """
    if keras.backend.backend() == "jax":
        from fashion_sd.sd import jax_compiles

        jax_compiles.prepare()  # before the networks' first compile
    w, h = image_size(resolution)
    if name == "diffusion_model":
        model = DiffusionModel(h, w, MAX_LENGTH, attention=attention)
    elif name == "text_encoder":
        model = TextEncoder(MAX_LENGTH)
    elif name == "image_encoder":
        model = ImageEncoder()
    elif name == "decoder":
        model = Decoder(h, w)
    else:
        raise ValueError(f"unknown component {name!r}; use one of {', '.join(COMPONENTS)}")
    if path is not None:
        try:
            model.load_weights(str(path))
        except Exception as exc:
            raise WeightsError(f"{path}: cannot load it into SD 1.x's {type(model).__name__} "
                               f"({type(exc).__name__}: {exc})") from None
    return model


def build_components(source: WeightsSource, resolution: int, which=COMPONENTS) -> Components:
    """Build the ``which`` components at ``resolution`` px with weights from ``source``.

    For random init, call ``keras.utils.set_random_seed`` first to make the weights reproducible.
    Set the dtype policy (mixed precision) before calling: layers take it when built.
    """
    if not valid_size(resolution):
        raise ValueError(f"resolution {resolution} is not a multiple of 64")
    comps = Components(source, resolution)
    for name in which:
        path = None if source.is_random else source.files[name]
        log.info("building %s (%s)", name, path or "random init")
        setattr(comps, name, build_component(name, resolution, path))
    return comps


def save_components(comps: Components, folder: str | Path) -> Path:
    """Write each built component as ``<KerasCV name>.weights.h5`` plus ``source.json``.

    The folder loads back with ``model.weights: local:DIR``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    saved = {}
    for name in COMPONENTS:
        model = getattr(comps, name)
        if model is not None:
            path = folder / WEIGHT_FILES[name].keras3_name
            tmp = path.with_name(".tmp-" + path.name)  # Keras insists on the .weights.h5 suffix
            model.save_weights(str(tmp))
            tmp.replace(path)
            saved[name] = path.name
    atomic_write_text(folder / "source.json", json.dumps(
        {"origin": comps.source.to_dict(), "components": saved}, indent=2) + "\n")
    return folder
