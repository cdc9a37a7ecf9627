"""The training options of the leading trainers: min-SNR-gamma weighting, noise offset, caption
dropout and EMA, each against a closed form or an independent reference, and a resume with all
of them on that is still bit-exact."""

import keras
import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file
from test_data import encoded
from test_run import build, config, train  # noqa: F401 - build is a fixture
from test_trainer import batches, make

from fashion_sd import data, diffusion
from fashion_sd.callbacks import KeepRawWeights
from fashion_sd import trainer as tr
from fashion_sd.config import TrainConfig


def test_min_snr_weights_match_diffusers():
    import torch
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    # SD 1.x's schedule as diffusers writes it
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    t = np.array([0, 1, 10, 100, 250, 500, 750, 999], np.int32)
    snr_ref = compute_snr(sched, torch.tensor(t, dtype=torch.long)).numpy()
    np.testing.assert_allclose(np.asarray(diffusion.snr(t, diffusion.alphas_cumprod())), snr_ref,
                               rtol=2e-5)
    gamma = 5.0  # diffusers' train_text_to_image_lora.py, epsilon target
    ref = np.minimum(snr_ref, gamma) / snr_ref
    got = np.asarray(diffusion.min_snr_weights(t, diffusion.alphas_cumprod(), gamma))
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    assert got[0] < 0.01 and got[-1] == 1.0  # low noise down-weighted, high noise untouched


def test_weighted_epsilon_loss_is_the_weighted_mean_of_per_sample_mses():
    rng = np.random.default_rng(0)
    pred, noise = rng.standard_normal((2, 3, 4, 4, 2)).astype("float32")
    w = np.array([0.5, 1.0, 2.0], "float32")
    per_sample = ((pred - noise) ** 2).reshape(3, -1).mean(axis=1)
    assert float(diffusion.epsilon_loss(pred, noise, w)) == pytest.approx((per_sample * w).mean(), rel=1e-6)
    assert float(diffusion.epsilon_loss(pred, noise)) == pytest.approx(per_sample.mean(), rel=1e-6)


def test_noise_offset_is_one_constant_per_sample_and_channel():
    base = data._noise(3, 0, 7, 512, (4, 4, 4))
    off = data._noise(3, 0, 7, 512, (4, 4, 4), offset=0.1)
    np.testing.assert_array_equal(base[0].numpy(), off[0].numpy())  # VAE noise untouched
    np.testing.assert_array_equal(base[2].numpy(), off[2].numpy())  # timesteps untouched
    extra = (off[1].numpy() - base[1].numpy()) / 0.1
    assert extra.shape == (512, 4, 4, 4)
    np.testing.assert_allclose(extra, np.broadcast_to(extra[:, :1, :1, :], extra.shape), atol=1e-5)
    per = extra[:, 0, 0, :]
    assert abs(per.mean()) < 0.1 and abs(per.std() - 1.0) < 0.1  # N(0, 1), 2048 draws
    assert np.corrcoef(per[:, 0], per[:, 1])[0, 1] < 0.15  # channels drawn apart


def test_caption_dropout_rate_and_determinism():
    drops = data.caption_drops(seed=1, start_step=0, end_step=5000, batch_size=4, rate=0.1)
    assert drops.shape == (5000, 4)
    assert abs(drops.mean() - 0.1) < 4 * np.sqrt(0.1 * 0.9 / drops.size)  # 4 sigma
    np.testing.assert_array_equal(data.caption_drops(1, 4000, 5000, 4, 0.1), drops[4000:])
    assert not data.caption_drops(1, 0, 100, 4, 0.0).any()


def test_dropped_captions_train_on_the_samplers_unconditional_context(small_parts):
    from keras_cv.src.models.stable_diffusion.constants import _UNCONDITIONAL_TOKENS
    from keras_cv.src.models.stable_diffusion.stable_diffusion import StableDiffusion

    from fashion_sd.models import Components, WeightsSource
    from fashion_sd.tokenizer import tokenize

    comps = Components(WeightsSource("random", "random", id="r"), 64, **small_parts)
    assert tokenize([""], comps.tokenizer)[0][0].tolist() == _UNCONDITIONAL_TOKENS
    table = pd.DataFrame({"caption": ["a shirt", "a dress"], "image_path": ["x", "y"],
                          "split": ["train", "train"]})
    sd = StableDiffusion.__new__(StableDiffusion)  # only its unconditional context is used
    sd._text_encoder = comps.text_encoder
    uncond = np.asarray(sd._get_unconditional_context())[0]
    # the encodings encode_dataset caches: the captions and the empty prompt
    contexts = data.encode_text(comps.text_encoder, tokenize(["", "a dress", "a shirt"],
                                                             comps.tokenizer)[0])
    np.testing.assert_allclose(contexts[0], uncond, atol=1e-5)
    assert table.caption.nunique() == 2
    # in the batches: dropped samples carry the empty prompt's row, the rest their own
    enc = encoded()
    enc.uncond_index = 3
    batches_ = list(data.train_dataset(enc, 2, seed=5, start_step=0, end_step=40, flip=False,
                                       caption_dropout=0.5))
    drops = data.caption_drops(5, 0, 40, 2, 0.5)
    rows, _ = data.batch_plan(len(enc.splits["train"]), 2, 5, 0, 40, False)
    for step, b in enumerate(batches_):
        for j in range(2):
            want = 3 if drops[step, j] else enc.caption_index[enc.splits["train"][rows[step, j]]]
            np.testing.assert_array_equal(b["context"][j].numpy(), enc.contexts[want])
    assert 0 < drops.mean() < 1


def test_ema_follows_the_hand_computed_sequence():
    decay = 0.8
    t, layers = make()
    opt = tr.make_optimizer(TrainConfig(learning_rate=1e-3, weight_decay=0.01, grad_clip=1.0,
                                        ema_decay=decay), 100, "float32")
    t.compile(optimizer=opt, jit_compile=False)
    t.optimizer.build(t.trainable_variables)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append([v.numpy().copy() for v in t.trainable_variables])

    t.fit(batches(n=4).repeat(), epochs=1, steps_per_epoch=6, verbose=0, shuffle=False,
          callbacks=[Record(), KeepRawWeights()])  # as run.train fits
    expected = [x.copy() for x in seen[0]]  # Keras starts the average at the first step's value
    for values in seen[1:]:
        expected = [decay * a + (1 - decay) * v for a, v in zip(expected, values)]
    raw = [v.numpy().copy() for v in t.trainable_variables]
    with tr.ema_weights(t.optimizer, t.trainable_variables):
        for v, e in zip(t.trainable_variables, expected):
            np.testing.assert_allclose(v.numpy(), e, rtol=1e-5, atol=1e-7)
    for v, r in zip(t.trainable_variables, raw):  # the raw weights are back after the block
        np.testing.assert_array_equal(v.numpy(), r)
    assert any(not np.allclose(e, r) for e, r in zip(expected, raw))


OPTIONS = ["train.snr_gamma=5", "train.noise_offset=0.05", "train.caption_dropout=0.2",
           "train.ema_decay=0.9"]


def test_all_options_on_resume_bit_exact(tmp_path, demo_captions, encoder_cache, build):  # noqa: F811
    straight = train(config(tmp_path, demo_captions, encoder_cache, *OPTIONS, name="straight"), build)
    assert straight["options"] == {"snr_gamma": 5.0, "noise_offset": 0.05, "caption_dropout": 0.2,
                                   "ema_decay": 0.9}
    train(config(tmp_path, demo_captions, encoder_cache, *OPTIONS, "train.max_steps=5",
                 name="resumed"), build)
    train(config(tmp_path, demo_captions, encoder_cache, *OPTIONS, name="resumed"), build, resume=True)
    for name in ("last.lora.safetensors", "raw/last.lora.safetensors"):
        a = load_file(str(tmp_path / "straight/checkpoints" / name))
        b = load_file(str(tmp_path / "resumed/checkpoints" / name))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    ck = tmp_path / "straight/checkpoints"
    ema, raw = load_file(str(ck / "last.lora.safetensors")), load_file(str(ck / "raw/last.lora.safetensors"))
    assert any(not np.array_equal(ema[k], raw[k]) for k in ema)  # the checkpoint is the EMA
    from fashion_sd.lora import read_lora

    assert read_lora(ck / "last.lora.safetensors")[1]["weights"] == "ema"
    assert sorted(p.name for p in (ck / "raw").iterdir()) == sorted(
        p.name for p in ck.glob("*.lora.safetensors"))


def _fresh_text_encoder_build(small_parts):
    """Components whose text encoder is built anew (seeded) for each run: training LoRA on it
    changes the model, which the session's shared one must not be."""
    from tiny import tiny_unet

    from fashion_sd import models

    def make(source, resolution):
        keras.utils.set_random_seed(0)
        te = models.build_component("text_encoder", resolution)
        return models.Components(source, resolution, diffusion_model=tiny_unet(resolution // 8),
                                 text_encoder=te, image_encoder=small_parts["image_encoder"],
                                 decoder=small_parts["decoder"])
    return make


def test_text_encoder_lora_trains_at_its_own_learning_rate():
    import tensorflow as tf
    from tiny import tiny_unet

    from fashion_sd import lora, models
    from fashion_sd.config import LoraConfig

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


def test_text_encoder_lora_run_resumes(tmp_path, demo_captions, encoder_cache, small_parts):
    """Exact to float rounding, not bit for bit: with the text encoder inside TensorFlow's
    training graph, two identical runs on this CPU already differ in the last bits (measured even
    with the text encoder frozen, oneDNN off and one inter-op thread), so resume is held to the
    same tolerance as two fresh runs. U-Net-only runs stay bit-exact (the tests above)."""
    build = _fresh_text_encoder_build(small_parts)
    opts = ["lora.text_encoder=true", "train.text_encoder_lr=2e-4", "train.caption_dropout=0.2",
            "train.ema_decay=0.9"]
    straight = train(config(tmp_path, demo_captions, encoder_cache, *opts, name="straight"), build)
    assert straight["text_encoder_lora"] is True
    train(config(tmp_path, demo_captions, encoder_cache, *opts, "train.max_steps=5",
                 name="resumed"), build)
    train(config(tmp_path, demo_captions, encoder_cache, *opts, name="resumed"), build, resume=True)
    a = load_file(str(tmp_path / "straight/checkpoints/last.lora.safetensors"))
    b = load_file(str(tmp_path / "resumed/checkpoints/last.lora.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("te11.v_proj") for k in a)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert np.abs(a["te00.q_proj.lora_b"]).max() > 0  # the text encoder's LoRA trained
