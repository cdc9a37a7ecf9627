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
