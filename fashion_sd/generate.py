"""Text -> image with KerasCV's own sampler, on components we built (and may have LoRA-tuned).

KerasCV's ``StableDiffusion`` would download its weights lazily and rounds sizes to multiples of
128 (64 px becomes 0), so we hand it our components and our size; the DDIM loop, guidance and
decoding are KerasCV's ``generate_image``. Each image's starting noise is drawn from its own seed,
so an image depends on (prompt, seed, steps, guidance) only, not on what was batched with it.
"""

from __future__ import annotations

import contextlib
import io
import logging

import keras
import numpy as np

from fashion_sd.data import tokenize
from fashion_sd.models import Components
from fashion_sd.tokenizer import MAX_LENGTH

log = logging.getLogger(__name__)


class Sampler:
    """Generates images with the text encoder, U-Net and decoder of ``comps``."""

    def __init__(self, comps: Components):
        from keras_cv.models import StableDiffusion

        missing = [n for n in ("text_encoder", "diffusion_model", "decoder") if getattr(comps, n) is None]
        if missing:
            raise ValueError(f"the sampler needs {', '.join(missing)}")
        with contextlib.redirect_stdout(io.StringIO()):  # KerasCV prints its licence on creation
            sd = StableDiffusion(img_height=128, img_width=128, jit_compile=False)
        sd.img_height = sd.img_width = comps.resolution
        sd._text_encoder = comps.text_encoder
        sd._diffusion_model = comps.diffusion_model
        sd._decoder = comps.decoder
        sd._tokenizer = comps.tokenizer
        self.sd = sd
        self.comps = comps

    def encode(self, prompt: str):
        """(1, 77, 768) context; prompts over 77 tokens are truncated with a warning."""
        if not prompt.strip():
            raise ValueError("empty prompt")
        tokens, truncated = tokenize([prompt], self.comps.tokenizer)
        if truncated:
            log.warning("prompt over %d tokens truncated: %r", MAX_LENGTH, prompt)
        positions = np.arange(MAX_LENGTH, dtype=np.int32)[None]
        return self.comps.text_encoder.predict_on_batch({"tokens": tokens, "positions": positions})

    def initial_noise(self, seeds: list[int]):
        h = self.comps.resolution // 8
        return keras.ops.concatenate(
            [keras.random.normal((1, h, h, 4), seed=int(s)) for s in seeds], axis=0)

    def generate(self, prompt: str, seeds: list[int], steps: int = 50, guidance: float = 7.5,
                 negative_prompt: str | None = None) -> np.ndarray:
        """uint8 images (len(seeds), H, W, 3) for one prompt."""
        context = self.encode(prompt)
        with contextlib.redirect_stdout(io.StringIO()):  # KerasCV's per-call progress bar
            return self.sd.generate_image(
                context, negative_prompt=negative_prompt, batch_size=len(seeds),
                num_steps=steps, unconditional_guidance_scale=guidance,
                diffusion_noise=self.initial_noise(seeds))
