"""keras-hub's CLIP as an embedder of generated images and of texts (``eval.clip``), computing
what OpenAI's CLIP (and transformers' ``CLIPModel``) computes.

``eval.clip``:

- ``pretrained``: ``keras_hub.models.CLIPBackbone.from_preset`` of ``eval.clip_preset`` (its
  keras-hub name: ``clip-vit-large-patch14`` is ``clip_vit_large_patch14``), fetched from Kaggle
  Models by keras-hub (``kagglehub``) and cached in ``$KAGGLEHUB_CACHE`` (default
  ``~/.cache/kagglehub``) after the first download; offline and not cached is an error that
  names what to download.
- ``local:DIR``: a keras-hub CLIP preset folder (``config.json`` + ``model.weights.h5``), e.g.
  the unpacked Kaggle download or one written by :func:`fashion_sd.sd.hub_clip.save`. A KerasCV
  CLIP preset (what this option read before keras-hub) is refused, saying so.
- ``hf:DIR``: a transformers CLIP folder (``openai/clip-vit-large-patch14``, FashionCLIP
  ``patrickjohncyh/fashion-clip``, ...), converted on first use and cached beside it
  (:mod:`fashion_sd.interop.clip`).
- ``auto``: pretrained when it can be had, else no CLIP metrics (the tables leave those columns
  empty and say why). Never random.
- ``random``: the preset's architecture with random weights, only because a config says so;
  every table labels its CLIP numbers as meaningless.
- ``none``: no CLIP metrics.

The network is keras-hub's; what differs from transformers' and how each difference is met is
in :mod:`fashion_sd.sd.hub_clip` (the final text LayerNorm's epsilon, the vision position ids of
a fresh model, the end-token padding). Texts are tokenized with the package's own copy of CLIP's
BPE (:mod:`fashion_sd.sd.tokenizer`). Images follow transformers' PIL ``CLIPImageProcessor``
(``CLIPImageProcessorPil`` in transformers 5; the same steps as OpenAI's ``_transform``), not keras-hub's ``CLIPImageConverter`` (which crops the
centre square first and resizes it with Keras' resize, without antialiasing): bicubic resize of
the shorter side to the model's resolution (the longer side truncated to an integer), centre
crop, CLIP's mean and std. tests/evaluation/test_clip_reference.py proves image features, text
features and logits equal transformers' to 1e-5.

Nothing here imports TensorFlow or KerasCV (keras-hub imports TensorFlow only where it is
installed), so the judge runs on whichever Keras backend is set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from fashion_sd.errors import FashionSDError
from fashion_sd.evaluation.adherence import normalise
from fashion_sd.clip_spec import (
    ARCHITECTURES,
    ClipUnavailable,
    _folder,
    check_spec,
)
from fashion_sd.sd import hub_clip
from fashion_sd.sd.tokenizer import MAX_LENGTH, clip_tokenizer, tokenize

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])  # OpenAI CLIP's normalisation
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
VOCABULARY = 49408  # OpenAI's BPE, our tokenizer's


def preprocess(images, resolution: int) -> np.ndarray:
    """uint8 RGB images (any sizes) -> float32 (n, r, r, 3) as OpenAI CLIP's ``_transform``."""

    out = []
    for image in images:
        im = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
        # The shorter side to ``resolution``, the longer truncated (int(), not round()) as
        # transformers' get_resize_output_image_size and torchvision's Resize compute it.
        short, long = sorted(im.size)
        w, h = ((resolution, int(resolution * long / short)) if im.width <= im.height
                else (int(resolution * long / short), resolution))
        im = im.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - resolution) // 2, (h - resolution) // 2
        x = np.asarray(im.crop((left, top, left + resolution, top + resolution)), np.float64) / 255
        out.append(((x - CLIP_MEAN) / CLIP_STD).astype(np.float32))
    return np.stack(out)


@dataclass
class ClipModel:
    """Embeds images and texts into CLIP's joint space; ``random`` labels meaningless numbers."""

    name: str
    model: object  # keras_hub.models.CLIPBackbone, set up by fashion_sd.sd.hub_clip
    random: bool
    batch_size: int = 16

    @property
    def resolution(self) -> int:
        return hub_clip.resolution(self.model)

    @property
    def label(self) -> str:
        return f"{self.name} (RANDOM-INIT: CLIP numbers mean nothing)" if self.random else self.name

    def _empty(self) -> np.ndarray:
        return np.zeros((0, int(self.model.projection_dim)))

    def embed_images(self, images) -> np.ndarray:
        out = [np.asarray(self.model.get_vision_embeddings(
                   preprocess(images[s: s + self.batch_size], self.resolution)), np.float64)
               for s in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else self._empty()

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        out = []
        for s in range(0, len(texts), self.batch_size):
            ids, _ = tokenize(texts[s: s + self.batch_size], clip_tokenizer())
            out.append(np.asarray(self.model.get_text_embeddings(hub_clip.openai_padding(ids)),
                                  np.float64))
        return np.concatenate(out) if out else self._empty()

    def logits(self, image_emb, text_emb) -> np.ndarray:
        """(images, texts) ``exp(logit_scale) cos``: CLIP's logits per image (what keras-hub's
        ``CLIPHead`` computes too, here on embeddings already at hand)."""

        return hub_clip.logit_scale(self.model) * normalise(image_emb) @ normalise(text_emb).T


def hub_arguments(architecture: dict) -> dict:
    """keras-hub's arguments for a published CLIP architecture (:data:`ARCHITECTURES`, in the
    terms OpenAI's model cards use). OpenAI's CLIPs all have vision heads of 64 channels, MLPs
    four times as wide as the stream, 77 positions and the 49,408-token vocabulary."""

    a = {k: int(v) for k, v in architecture.items()}
    vision, text, size = a["vision_width"], a["transformer_width"], a["image_resolution"]
    return {"projection_dim": a["embed_dim"],
            "vision": dict(patch_size=a["vision_patch_size"], hidden_dim=vision,
                           num_layers=a["vision_layers"], num_heads=vision // 64,
                           intermediate_dim=4 * vision, image_shape=(size, size, 3)),
            "text": dict(vocabulary_size=VOCABULARY, embedding_dim=text, hidden_dim=text,
                         num_layers=a["transformer_layers"], num_heads=a["transformer_heads"],
                         intermediate_dim=4 * text, max_sequence_length=MAX_LENGTH)}


def random_clip(preset: str, seed: int = 0, **overrides):
    """The preset's architecture, randomly initialised (``overrides``, in :data:`ARCHITECTURES`'
    terms, shrink it for tests)."""

    if preset not in ARCHITECTURES:
        raise ClipUnavailable(f"eval.clip_preset {preset!r}: use one of {sorted(ARCHITECTURES)}")
    keras.utils.set_random_seed(seed)
    return hub_clip.build(hub_arguments({**ARCHITECTURES[preset], **overrides}))


def hub_preset(preset: str) -> str:
    """keras-hub's name for ``eval.clip_preset`` (its presets spell the same names with ``_``)."""
    return preset.replace("-", "_")


def _help(preset: str) -> str:
    name = hub_preset(preset)
    try:  # keras-hub's table names the version it loads; without keras-hub, the latest
        handle = hub_clip.keras_hub().models.CLIPBackbone.presets[name]["kaggle_handle"]
    except (ClipUnavailable, KeyError):
        handle = f"kaggle://keras/clip/keras/{name}"
    return (f"Download the Kaggle model {handle.removeprefix('kaggle://')} (a keras-hub preset "
            f"folder with config.json and model.weights.h5) on a machine with internet and set "
            f"eval.clip: local:DIR, or run once online (keras-hub caches it in $KAGGLEHUB_CACHE, "
            f"default ~/.cache/kagglehub); eval.clip: none turns the CLIP metrics off.")


def _is_kerascv(folder: Path) -> bool:
    """Whether ``folder`` holds a KerasCV CLIP preset, which ``local:DIR`` named before keras-hub."""
    try:
        config = json.loads((folder / "config.json").read_text())
        return str(config.get("registered_name", "")).startswith("keras_cv>")
    except (OSError, ValueError, AttributeError):
        return False


def _load_preset(folder: Path, spec: str):
    try:
        return hub_clip.load(folder)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds for a bad preset
        hint = (". It is a KerasCV CLIP preset, which the judge no longer reads: give keras-hub's "
                "(Kaggle keras/clip/keras/...) or the transformers folder as hf:DIR."
                if _is_kerascv(folder) else "")
        raise ClipUnavailable(f"eval.clip: {spec}: cannot load the CLIP preset in {folder}: "
                              f"{type(exc).__name__}: {str(exc)[:300]}{hint}") from exc


def _from_transformers(spec: str) -> ClipModel:
    from fashion_sd.interop.clip import cached_preset  # noqa: PLC0415 - reads safetensors

    folder = _folder(spec)
    try:
        cache = cached_preset(folder)
    except FashionSDError as exc:
        raise ClipUnavailable(f"eval.clip: {spec}: {exc}") from None
    return ClipModel(f"hf:{folder.name}", _load_preset(cache, spec), False)


def _pretrained(spec: str, preset: str) -> tuple[ClipModel | None, str]:
    try:
        model = hub_clip.load(hub_preset(preset))
    except Exception as exc:  # noqa: BLE001 - kagglehub raises connection errors of its own
        why = f"cannot get CLIP {preset}: {type(exc).__name__}: {str(exc)[:200]}. {_help(preset)}"
        if spec == "pretrained":
            raise ClipUnavailable(f"eval.clip: pretrained: {why}") from exc
        return None, f"eval.clip: auto: {why}"
    return ClipModel(preset, model, False), ""


def load_clip(spec: str, preset: str, seed: int = 0) -> tuple[ClipModel | None, str]:
    """(model or None, why) for ``eval.clip``; raises :class:`ClipUnavailable` when a spec that
    must load (pretrained, local:DIR, hf:DIR) cannot."""
    if spec == "none":
        return None, "eval.clip: none"
    if spec == "random":
        return ClipModel(f"{preset}/random-init(seed={seed})", random_clip(preset, seed), True), ""
    if spec.startswith("hf:"):
        check_spec(spec)
        return _from_transformers(spec), ""
    if spec.startswith("local:"):
        check_spec(spec)
        folder = _folder(spec)
        return ClipModel(f"local:{folder.name}", _load_preset(folder, spec), False), ""
    if spec not in ("pretrained", "auto"):
        raise ClipUnavailable(f"eval.clip: {spec!r}: use auto, pretrained, random, none, local:DIR "
                              "or hf:DIR")
    return _pretrained(spec, preset)
