"""The settings of one generated image, kept in its PNG (no TensorFlow: the app's gallery and
``--from-png`` read them before any model is built)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, PngImagePlugin

from fashion_sd.files import atomic_path

PNG_KEY = "fashion-sd"  # the PNG text chunk holding an image's settings as JSON


@dataclass
class ImageSettings:
    """Everything that made one image, stored in its PNG so that ``--from-png`` remakes it.

    The one record of image settings: ``generate.py`` and the app write it, ``--from-png`` and
    the app's gallery read it.
    """

    prompt: str
    seed: int
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    resolution: int | list[int] | None = None  # a square, or [width, height]
    weights: str | None = None  # the model.weights to rebuild with ("random" for a random init)
    weights_id: str | None = None
    model_seed: int | None = None  # the seed random-init weights were drawn with
    random_init: bool | None = None
    checkpoint: str | None = None  # the app's name for the LoRA
    lora: str | None = None
    lora_strength: float | None = None
    batch_seeds: list[int] = field(default_factory=list)  # float rounding depends on the batch
    # How the seed became the starting latent (fashion_sd.sd.ddim.NOISES); None in PNGs written
    # before it was recorded, which used "keras".
    noise: str | None = None
    # How decoded floats became uint8 pixels (fashion_sd.sd.ddim.ROUNDINGS); None in PNGs written
    # before it was recorded, which truncated.
    rounding: str | None = None
    made_by: str = "fashion-sd generate"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ImageSettings:
        """From stored settings; keys this version does not know are ignored, and a known one
        of the wrong kind (an edited or foreign PNG) is a ValueError naming it."""
        if not isinstance(data, dict):
            raise ValueError(f"image settings are a {type(data).__name__}, not a mapping")
        missing = [k for k in ("prompt", "seed") if k not in data]
        if missing:
            raise ValueError(f"image settings without {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in data.items() if k in known}
        for key, value in kept.items():
            if not _KINDS[key][1](value):
                raise ValueError(f"its setting {key!r} is {value!r}, not {_KINDS[key][0]}")
        return cls(**kept)

    @classmethod
    def from_record(cls, record: dict, **settings) -> ImageSettings:
        """Settings of an image made with :func:`load_sampler`'s ``record``."""
        weights = record.get("weights", {})
        return cls(resolution=record.get("resolution"),
                   weights="random" if record.get("random_init") else weights.get("requested"),
                   weights_id=weights.get("id"), model_seed=record.get("model_seed"),
                   random_init=record.get("random_init"), lora=record.get("lora"),
                   lora_strength=record.get("lora_strength"), noise=record.get("noise"),
                   rounding=record.get("rounding"),
                   **settings)

    def save_png(self, path, image: np.ndarray) -> None:
        """Write ``image`` atomically with these settings in PNG text metadata."""

        info = PngImagePlugin.PngInfo()
        info.add_text(PNG_KEY, json.dumps(self.to_dict(), default=str))
        info.add_text("prompt", str(self.prompt))  # readable in any image viewer
        with atomic_path(path) as tmp:
            Image.fromarray(image).save(tmp, format="PNG", pnginfo=info)

    @classmethod
    def read_png(cls, path) -> ImageSettings:

        with Image.open(path) as im:
            text = getattr(im, "text", {}) or {}
        if PNG_KEY not in text:
            raise ValueError(f"{path}: no fashion-sd settings in this PNG (only images written by "
                             "scripts/generate.py carry them)")
        return cls.from_dict(json.loads(text[PNG_KEY]))


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return (_whole(v) or isinstance(v, float)) and np.isfinite(v)


def _optional(test):
    return lambda v: v is None or test(v)


def _text(v) -> bool:
    return isinstance(v, str)


# What each stored setting must be, said in words for the error: read from a PNG, it may have
# been edited or written by another tool.
_KINDS = {
    "prompt": ("text", _text),
    "seed": ("a whole number from 0 to 2^32 - 1", lambda v: _whole(v) and 0 <= v < 2**32),
    "steps": ("a whole number of steps", _optional(lambda v: _whole(v) and v >= 1)),
    "guidance": ("a number", _optional(_number)),
    "negative_prompt": ("text", _optional(_text)),
    "resolution": ("pixels (a whole number, or [width, height])", _optional(
        lambda v: _whole(v) or (isinstance(v, list) and len(v) == 2 and all(map(_whole, v))))),
    "weights": ("text", _optional(_text)),
    "weights_id": ("text", _optional(_text)),
    "model_seed": ("a whole number", _optional(_whole)),
    "random_init": ("true or false", _optional(lambda v: isinstance(v, bool))),
    "checkpoint": ("text", _optional(_text)),
    "lora": ("a file name", _optional(_text)),
    "lora_strength": ("a number", _optional(_number)),
    "batch_seeds": ("a list of seeds", lambda v: isinstance(v, list) and all(
        _whole(x) and 0 <= x < 2**32 for x in v)),
    "noise": ("one of philox, keras", _optional(lambda v: v in ("philox", "keras"))),
    "rounding": ("one of round, truncate", _optional(lambda v: v in ("round", "truncate"))),
    "made_by": ("text", _text),
}
