"""The real KerasCV U-Net (860M parameters) at 64 px: LoRA count and identity, and merge. (A run
from weights saved to a folder and loaded back is the sweep test's, tests/test_cli.py.) Marked
slow (minutes)."""

import gc

import keras
import numpy as np
import pytest

from fashion_sd.config import LoraConfig
from fashion_sd.sd import lora, models
from fashion_sd.sd.lora_file import expected_kernel_shapes

pytestmark = pytest.mark.slow
TARGETS = ["to_q", "to_k", "to_v", "out_proj"]


def unet(seed=0):
    keras.utils.set_random_seed(seed)
    return models.build_component("diffusion_model", 64)


def inputs():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, 8, 8, 4)).astype("float32"),
            rng.standard_normal((1, 320)).astype("float32"),
            rng.standard_normal((1, 77, 768)).astype("float32")]


def test_lora_on_the_real_unet(tmp_path):
    model = unet()
    x = inputs()
    before = np.asarray(model(x))
    # the static table that checks LoRA files before any model is built is this model's
    shapes = {k: tuple(d.kernel.shape) for k, d in lora.attention_projections(model).items()}
    assert shapes == {k: v for k, v in expected_kernel_shapes().items() if k.startswith("st")}
    layers = lora.apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
    assert len(layers) == 128
    assert sum(int(np.prod(v.shape)) for v in model.trainable_weights) == 797_184
    np.testing.assert_array_equal(np.asarray(model(x)), before)  # zero-init B: identity
    rng = np.random.default_rng(1)
    for layer in layers.values():
        layer.lora_kernel_b.assign(rng.standard_normal(layer.lora_kernel_b.shape).astype("float32") * 0.02)
    tuned = np.asarray(model(x))
    path = lora.save_lora(tmp_path / "u.lora.safetensors", layers, LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
    assert 3.0e6 < path.stat().st_size < 3.5e6  # LoRA only: about 3 MB at rank 4
    del model, layers
    gc.collect()
    plain = unet()  # the same base weights, no LoRA
    lora.merge_lora(plain, path)
    merged = np.asarray(plain(x))
    assert np.abs(tuned - before).max() > 1e-3
    np.testing.assert_allclose(merged, tuned, atol=1e-4 * np.abs(tuned).max())
