"""KerasCV's CLIP as an embedder of generated images and of texts (``eval.clip``), repaired to
compute what OpenAI's CLIP (and transformers' ``CLIPModel``) computes.

``eval.clip``:

- ``pretrained``: ``keras_cv.models.CLIP.from_preset(eval.clip_preset)``, fetched from Kaggle
  Models by KerasCV (``kagglehub``) and cached in ``$KAGGLEHUB_CACHE`` (default
  ``~/.cache/kagglehub``) after the first download; offline and not cached is an error that
  names what to download.
- ``local:DIR``: a preset folder (``config.json`` + ``model.weights.h5``), e.g. the unpacked
  Kaggle download or one written by :func:`save_clip`.
- ``hf:DIR``: a transformers CLIP folder (``openai/clip-vit-large-patch14``, FashionCLIP
  ``patrickjohncyh/fashion-clip``, ...), converted on first use and cached beside it
  (:mod:`fashion_sd.interop.clip`).
- ``auto``: pretrained when it can be had, else no CLIP metrics (the tables leave those columns
  empty and say why). Never random.
- ``random``: the preset's architecture with random weights, only because a config says so;
  every table labels its CLIP numbers as meaningless.
- ``none``: no CLIP metrics.

KerasCV's CLIP is repaired on each instance to compute OpenAI's (:mod:`fashion_sd.sd.kerascv_clip`).
Only ``call`` and one epsilon change: variables and weight files stay KerasCV's. Texts are
tokenized with the package's own copy of CLIP's BPE (:mod:`fashion_sd.sd.tokenizer`). Images
follow transformers' ``CLIPImageProcessor`` (the same steps as OpenAI's ``_transform``): bicubic
resize of the shorter side to the model's resolution (the longer side truncated to an integer),
centre crop, CLIP's mean and std. tests/evaluation/test_clip_reference.py proves image features, text
features and logits equal transformers' to 1e-5.
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
from fashion_sd.sd.kerascv_clip import clip_class, repair
from fashion_sd.sd.tokenizer import END_TOKEN, clip_tokenizer, tokenize

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])  # OpenAI CLIP's normalisation
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


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
    model: object  # keras_cv.models.CLIP
    random: bool
    batch_size: int = 16

    @property
    def resolution(self) -> int:
        return int(self.model.image_resolution)

    @property
    def label(self) -> str:
        return f"{self.name} (RANDOM-INIT: CLIP numbers mean nothing)" if self.random else self.name

    def embed_images(self, images) -> np.ndarray:
        out = [np.asarray(self.model.image_encoder(preprocess(images[s: s + self.batch_size],
                                                               self.resolution)), np.float64)
               for s in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.model.embed_dim))

    def embed_texts(self, texts: list[str]) -> np.ndarray:

        out = []
        for s in range(0, len(texts), self.batch_size):
            ids, _ = tokenize(texts[s: s + self.batch_size], clip_tokenizer())
            # Real tokens are everything up to and including the first end token.
            first_end = np.argmax(ids == END_TOKEN, axis=1)
            mask = (np.arange(ids.shape[1])[None] <= first_end[:, None]).astype("int32")
            out.append(np.asarray(self.model.text_encoder(ids, attention_mask=mask), np.float64))
        return np.concatenate(out) if out else np.zeros((0, self.model.embed_dim))

    def logits(self, image_emb, text_emb) -> np.ndarray:
        """(images, texts) ``exp(logit_scale) cos``: CLIP's logits per image, row by row (KerasCV's
        ``CLIPHead`` would divide by the norm of the whole batch)."""

        scale = float(np.exp(np.asarray(self.model.clip_head.logit_scale)))
        return scale * normalise(image_emb) @ normalise(text_emb).T


def random_clip(preset: str, seed: int = 0, **overrides):
    """The preset's architecture, randomly initialised (``overrides`` shrink it for tests)."""

    if preset not in ARCHITECTURES:
        raise ClipUnavailable(f"eval.clip_preset {preset!r}: use one of {sorted(ARCHITECTURES)}")
    keras.utils.set_random_seed(seed)
    return repair(clip_class()(**{**ARCHITECTURES[preset], **overrides}))


def _help(preset: str) -> str:
    cls = clip_class()
    handle = cls.presets.get(preset, {}).get("kaggle_handle", "?")
    return (f"Download the Kaggle model {handle.removeprefix('kaggle://')} (a folder with "
            f"config.json and model.weights.h5) on a machine with internet and set eval.clip: "
            f"local:DIR, or run once online (KerasCV caches it in $KAGGLEHUB_CACHE, default "
            f"~/.cache/kagglehub); eval.clip: none turns the CLIP metrics off.")


def _load_preset(folder: Path, spec: str):
    config = folder / "config.json"
    try:
        weights = json.loads(config.read_text()).get("weights")
        model = clip_class().from_preset(str(folder), load_weights=weights is not None)
    except Exception as exc:  # noqa: BLE001 - Keras raises many kinds for a bad preset
        raise ClipUnavailable(f"eval.clip: {spec}: cannot load the CLIP preset in {folder}: "
                              f"{type(exc).__name__}: {exc}") from exc
    if weights is None:
        raise ClipUnavailable(f"eval.clip: {spec}: {config} names no weights file")
    return repair(model)


def load_clip(spec: str, preset: str, seed: int = 0) -> tuple[ClipModel | None, str]:
    """(model or None, why) for ``eval.clip``; raises :class:`ClipUnavailable` when a spec that
    must load (pretrained, local:DIR, hf:DIR) cannot."""
    if spec == "none":
        return None, "eval.clip: none"
    if spec == "random":
        return ClipModel(f"{preset}/random-init(seed={seed})", random_clip(preset, seed), True), ""
    if spec.startswith("local:"):
        check_spec(spec)
        folder = _folder(spec)
        return ClipModel(f"local:{folder.name}", _load_preset(folder, spec), False), ""
    if spec.startswith("hf:"):
        from fashion_sd.interop.clip import cached_preset  # noqa: PLC0415

        check_spec(spec)
        folder = _folder(spec)
        try:
            cache = cached_preset(folder)
        except FashionSDError as exc:
            raise ClipUnavailable(f"eval.clip: {spec}: {exc}") from None
        return ClipModel(f"hf:{folder.name}", _load_preset(cache, spec), False), ""
    if spec not in ("pretrained", "auto"):
        raise ClipUnavailable(f"eval.clip: {spec!r}: use auto, pretrained, random, none, local:DIR "
                              "or hf:DIR")
    try:
        model = clip_class().from_preset(preset)
    except Exception as exc:  # noqa: BLE001 - kagglehub raises connection errors of its own
        why = f"cannot get CLIP {preset}: {type(exc).__name__}: {str(exc)[:200]}. {_help(preset)}"
        if spec == "pretrained":
            raise ClipUnavailable(f"eval.clip: pretrained: {why}") from exc
        return None, f"eval.clip: auto: {why}"
    return ClipModel(preset, repair(model), False), ""
