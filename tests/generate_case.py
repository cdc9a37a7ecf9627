"""Images from one seed with a LoRA, on whatever backend Keras runs: the same code on both sides
of the cross-backend generation test. ``python tests/generate_case.py DIR`` reads the weights
and the LoRA that :func:`make_case` wrote and writes ``DIR/<backend>.images.npz``."""

import json
import sys
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_unet  # noqa: E402

from fashion_sd.config import LoraConfig  # noqa: E402
from fashion_sd.sd import lora, models  # noqa: E402
from fashion_sd.serving.generate import Sampler  # noqa: E402

PROMPT, SEEDS = "an image of a 2011 Casual Fall White Men's Sweater", [3, 2**32 - 1]
SPEC = LoraConfig(rank=2, alpha=4.0, targets=["to_q", "to_k", "to_v", "out_proj"])


def make_case(folder: Path, parts: dict) -> None:
    """The text encoder and decoder ``parts`` (64 px), a tiny U-Net and a LoRA trained for it."""
    for name, model in parts.items():
        model.save_weights(str(folder / f"{name}.weights.h5"))
    keras.utils.set_random_seed(0)
    unet = tiny_unet()
    unet.save_weights(str(folder / "unet.weights.h5"))
    layers = lora.apply_lora(unet, SPEC)
    rng = np.random.default_rng(0)
    for layer in layers.values():
        layer.lora_kernel_b.assign(0.2 * rng.standard_normal(layer.lora_kernel_b.shape))
    lora.save_lora(folder / "trained.lora.safetensors", layers, SPEC)


def run_case(folder: Path) -> np.ndarray:
    source = models.resolve_weights("random")
    comps = models.Components(source, 64)
    for name in ("text_encoder", "decoder"):
        setattr(comps, name, models.build_component(name, 64, folder / f"{name}.weights.h5"))
    comps.diffusion_model = tiny_unet()
    comps.diffusion_model.load_weights(str(folder / "unet.weights.h5"))
    deltas, _ = lora.lora_deltas(folder / "trained.lora.safetensors", comps.diffusion_model)
    lora.LoraSwap().apply(deltas, 0.8)
    images = Sampler(comps).generate(PROMPT, SEEDS, steps=3, guidance=7.5)
    backend = keras.backend.backend()
    np.savez(folder / f"{backend}.images.npz", images=images)
    (folder / f"{backend}.json").write_text(json.dumps(
        {m: m in sys.modules for m in ("tensorflow", "keras_cv", "torch")}))
    return images


if __name__ == "__main__":
    run_case(Path(sys.argv[1]))
