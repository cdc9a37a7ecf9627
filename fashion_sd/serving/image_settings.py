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
        """From stored settings; keys this version does not know are ignored."""
        missing = [k for k in ("prompt", "seed") if k not in data]
        if missing:
            raise ValueError(f"image settings without {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

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
