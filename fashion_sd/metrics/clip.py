"""KerasCV's CLIP as an embedder of generated images and of texts (``eval.clip``).

``eval.clip``:

- ``pretrained``: ``keras_cv.models.CLIP.from_preset(eval.clip_preset)``, fetched from Kaggle
  Models by KerasCV (``kagglehub``) and cached in ``$KAGGLEHUB_CACHE`` (default
  ``~/.cache/kagglehub``) after the first download; offline and not cached is an error that
  names what to download.
- ``local:DIR``: a preset folder (``config.json`` + ``model.weights.h5``), e.g. the unpacked
  Kaggle download or one written by :func:`save_clip`.
- ``auto``: pretrained when it can be had, else no CLIP metrics (the tables leave those columns
  empty and say why). Never random.
- ``random``: the preset's architecture with random weights, only because a config says so;
  every table labels its CLIP numbers as meaningless.
- ``none``: no CLIP metrics.

Texts are tokenized with the package's own copy of CLIP's BPE (:mod:`fashion_sd.tokenizer`),
padded with the end token as KerasCV's Stable Diffusion does; KerasCV's CLIP text encoder reads
each text's feature at the (first) end token. Images follow OpenAI CLIP's preprocessing:
bicubic resize of the shorter side to the model's resolution, centre crop, CLIP's mean and std.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fashion_sd.errors import FashionSDError

# The published CLIP architectures (OpenAI's model cards; the same numbers are in each Kaggle
# preset's config.json): random init of a preset needs them without the network.
ARCHITECTURES = {
    "clip-vit-base-patch16": dict(embed_dim=512, image_resolution=224, vision_layers=12,
                                  vision_width=768, vision_patch_size=16, transformer_width=512,
                                  transformer_heads=8, transformer_layers=12),
    "clip-vit-base-patch32": dict(embed_dim=512, image_resolution=224, vision_layers=12,
                                  vision_width=768, vision_patch_size=32, transformer_width=512,
                                  transformer_heads=8, transformer_layers=12),
    "clip-vit-large-patch14": dict(embed_dim=768, image_resolution=224, vision_layers=24,
                                   vision_width=1024, vision_patch_size=14, transformer_width=768,
                                   transformer_heads=12, transformer_layers=12),
    "clip-vit-large-patch14-336": dict(embed_dim=768, image_resolution=336, vision_layers=24,
                                       vision_width=1024, vision_patch_size=14,
                                       transformer_width=768, transformer_heads=12,
                                       transformer_layers=12),
}
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])  # OpenAI CLIP's normalisation
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


class ClipUnavailable(FashionSDError, RuntimeError):
    """The CLIP weights asked for cannot be loaded; the message says what to download."""


def _clip_class():
    from keras_cv.src.models.feature_extractor.clip import clip_model  # noqa: PLC0415

    # KerasCV's CLIP refuses to build without keras-nlp, which only its tokenizer
    # (CLIPProcessor) uses. We tokenize with our own copy of the same BPE, so the check is
    # lifted rather than pulling keras-nlp (and keras-hub, tensorflow-text) into the install.
    if clip_model.keras_nlp is None:
        clip_model.keras_nlp = True
    return clip_model.CLIP


def preprocess(images, resolution: int) -> np.ndarray:
    """uint8 RGB images (any sizes) -> float32 (n, r, r, 3) as OpenAI CLIP's ``_transform``."""
    from PIL import Image

    out = []
    for image in images:
        im = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
        scale = resolution / min(im.size)
        w, h = max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))
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
        from fashion_sd.tokenizer import END_TOKEN, clip_tokenizer, tokenize  # noqa: PLC0415

        out = []
        for s in range(0, len(texts), self.batch_size):
            ids, _ = tokenize(texts[s: s + self.batch_size], clip_tokenizer())
            # Real tokens are everything up to and including the first end token.
            first_end = np.argmax(ids == END_TOKEN, axis=1)
            mask = (np.arange(ids.shape[1])[None] <= first_end[:, None]).astype("int32")
            out.append(np.asarray(self.model.text_encoder(ids, attention_mask=mask), np.float64))
        return np.concatenate(out) if out else np.zeros((0, self.model.embed_dim))


def save_clip(model, folder: str | Path) -> Path:
    """Write ``model`` as a KerasCV preset folder that ``eval.clip: local:DIR`` loads."""
    from keras_cv.src.utils.preset_utils import save_to_preset  # noqa: PLC0415

    save_to_preset(model, str(folder))
    return Path(folder)


def random_clip(preset: str, seed: int = 0, **overrides):
    """The preset's architecture, randomly initialised (``overrides`` shrink it for tests)."""
    import keras  # noqa: PLC0415

    if preset not in ARCHITECTURES:
        raise ClipUnavailable(f"eval.clip_preset {preset!r}: use one of {sorted(ARCHITECTURES)}")
    keras.utils.set_random_seed(seed)
    return _clip_class()(**{**ARCHITECTURES[preset], **overrides})


def _help(preset: str) -> str:
    cls = _clip_class()
    handle = cls.presets.get(preset, {}).get("kaggle_handle", "?")
    return (f"Download the Kaggle model {handle.removeprefix('kaggle://')} (a folder with "
            f"config.json and model.weights.h5) on a machine with internet and set eval.clip: "
            f"local:DIR, or run once online (KerasCV caches it in $KAGGLEHUB_CACHE, default "
            f"~/.cache/kagglehub); eval.clip: none turns the CLIP metrics off.")


def check_spec(spec: str, key: str = "eval.clip") -> None:
    """What can be checked without loading: a local:DIR preset folder exists with its config."""
    if spec.startswith("local:"):
        folder = Path(spec[len("local:"):]).expanduser()
        if not (folder / "config.json").is_file():
            raise ClipUnavailable(f"{key}: {spec}: no config.json in {folder}; give a KerasCV CLIP "
                                  "preset folder (config.json + model.weights.h5), or set "
                                  f"{key}: auto or none")


def load_clip(spec: str, preset: str, seed: int = 0) -> tuple[ClipModel | None, str]:
    """(model or None, why) for ``eval.clip``; raises :class:`ClipUnavailable` when a spec that
    must load (pretrained, local:DIR) cannot."""
    if spec == "none":
        return None, "eval.clip: none"
    if spec == "random":
        return ClipModel(f"{preset}/random-init(seed={seed})", random_clip(preset, seed), True), ""
    if spec.startswith("local:"):
        check_spec(spec)
        folder = Path(spec[len("local:"):]).expanduser()
        config = folder / "config.json"
        try:
            weights = json.loads(config.read_text()).get("weights")
            model = _clip_class().from_preset(str(folder), load_weights=weights is not None)
        except Exception as exc:  # noqa: BLE001 - Keras raises many kinds for a bad preset
            raise ClipUnavailable(f"eval.clip: {spec}: cannot load the CLIP preset in {folder}: "
                                  f"{type(exc).__name__}: {exc}") from exc
        if weights is None:
            raise ClipUnavailable(f"eval.clip: {spec}: {config} names no weights file")
        return ClipModel(f"local:{folder.name}", model, False), ""
    if spec not in ("pretrained", "auto"):
        raise ClipUnavailable(f"eval.clip: {spec!r}: use auto, pretrained, random, none or local:DIR")
    try:
        model = _clip_class().from_preset(preset)
    except Exception as exc:  # noqa: BLE001 - kagglehub raises connection errors of its own
        why = f"cannot get CLIP {preset}: {type(exc).__name__}: {str(exc)[:200]}. {_help(preset)}"
        if spec == "pretrained":
            raise ClipUnavailable(f"eval.clip: pretrained: {why}") from exc
        return None, f"eval.clip: auto: {why}"
    return ClipModel(preset, model, False), ""
