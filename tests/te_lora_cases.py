"""Text-encoder LoRA training (lora.text_encoder): run by tests/training/test_encoder_lora.py in a process
of its own, because each case builds fresh CLIP text encoders (LoRA changes the model, so the
session's shared one cannot be used) and the suite's own process is near the machine's memory
by its end. Not collected by the main run (no test_ prefix)."""

import keras
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_run import config, train

from fashion_sd.config import TrainConfig
from fashion_sd.training import trainer as tr


def _fresh_text_encoder_build(small_parts):
    """Components whose text encoder is built anew (seeded) for each run: training LoRA on it
    changes the model, which the session's shared one must not be."""
    from tiny import tiny_unet

    from fashion_sd.sd import models

    def make(source, resolution):
        # Each session of a run starts in a fresh process in real use; Keras' layer naming state
        # is that of a fresh process here too (the graph TensorFlow builds, and with the text
        # encoder in it the last bits of the result, depend on those names).
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        te = models.build_component("text_encoder", resolution)
        return models.Components(source, resolution, diffusion_model=tiny_unet(resolution // 8),
                                 text_encoder=te, image_encoder=small_parts["image_encoder"],
                                 decoder=small_parts["decoder"])
    return make


def test_text_encoder_lora_trains_at_its_own_learning_rate():
    import tensorflow as tf
    from tiny import tiny_unet

    from fashion_sd.config import LoraConfig
    from fashion_sd.sd import lora, models

    keras.utils.set_random_seed(0)
    te, unet = models.build_component("text_encoder", 64), tiny_unet()
    spec = LoraConfig(rank=2, alpha=4.0)
    unet_layers, te_layers = lora.apply_lora(unet, spec), lora.apply_text_encoder_lora(te, spec)
    assert len(te_layers) == 48 and sorted(te_layers)[0] == "te00.k_proj"
    t = tr.LoraTrainer(unet, text_encoder=te)
    te_vars = [v for d in te_layers.values() for v in (d.lora_kernel_a, d.lora_kernel_b)]
    assert {id(v) for v in t.trainable_variables} >= {id(v) for v in te_vars}
    opt = tr.make_optimizer(TrainConfig(learning_rate=1e-3, text_encoder_lr=1e-4, weight_decay=0.0,
                                        grad_clip=None), 100, "float32", 1, te_vars)
    t.compile(optimizer=opt, jit_compile=False)
    t.optimizer.build(t.trainable_variables)
    rng = np.random.default_rng(0)
    batch = {"moments": rng.standard_normal((2, 8, 8, 8)).astype("float32"),
             "tokens": rng.integers(0, 49407, (2, 77)).astype("int32"),
             "vae_eps": rng.standard_normal((2, 8, 8, 4)).astype("float32"),
             "noise": rng.standard_normal((2, 8, 8, 4)).astype("float32"),
             "timesteps": np.array([10, 500], "int32")}
    t.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0)
    # AdamW's first step from B = 0 moves each element by lr * g / (|g| + eps), i.e. by lr
    unet_step = max(np.abs(d.lora_kernel_b.numpy()).max() for d in unet_layers.values())
    te_step = max(np.abs(d.lora_kernel_b.numpy()).max() for d in te_layers.values())
    assert unet_step == pytest.approx(1e-3, rel=1e-3) and te_step == pytest.approx(1e-4, rel=1e-3)
    assert tr.learning_rate(t.optimizer) == pytest.approx(1e-3, rel=1e-3)  # one cosine step on


def test_text_encoder_lora_run_resumes_bit_exact(tmp_path, demo_captions, encoder_cache, small_parts):
    make = _fresh_text_encoder_build(small_parts)
    # One epoch (8 steps), stopped after 3: each step runs the real-size text encoder, and a
    # mid-epoch stop is the harder resume (the data position is restored, not an epoch start).
    opts = ["lora.text_encoder=true", "train.text_encoder_lr=2e-4", "train.caption_dropout=0.2",
            "train.ema_decay=0.9", "train.epochs=1"]
    straight = train(config(tmp_path, demo_captions, encoder_cache, *opts, name="straight"), make)
    assert straight["text_encoder_lora"] is True and straight["step"] == 8
    train(config(tmp_path, demo_captions, encoder_cache, *opts, "train.max_steps=3",
                 name="resumed"), make)
    train(config(tmp_path, demo_captions, encoder_cache, *opts, name="resumed"), make, resume=True)
    a = load_file(str(tmp_path / "straight/checkpoints/last.lora.safetensors"))
    b = load_file(str(tmp_path / "resumed/checkpoints/last.lora.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("te11.v_proj") for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert np.abs(a["te00.q_proj.lora_b"]).max() > 0  # the text encoder's LoRA trained
