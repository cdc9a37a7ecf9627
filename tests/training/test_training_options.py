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

from fashion_sd.config import TrainConfig
from fashion_sd.sd import diffusion
from fashion_sd.training import data, draws
from fashion_sd.training import trainer as tr
from fashion_sd.training.callbacks import KeepRawWeights


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
    base = draws.train_draws(3, 7, 512, (4, 4, 4))
    off = draws.train_draws(3, 7, 512, (4, 4, 4), offset=0.1)
    np.testing.assert_array_equal(base[0], off[0])  # VAE noise untouched
    np.testing.assert_array_equal(base[2], off[2])  # timesteps untouched
    extra = (off[1] - base[1]) / 0.1
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

    from fashion_sd.sd.models import Components, WeightsSource
    from fashion_sd.sd.tokenizer import tokenize

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
    batches_ = list(data.train_dataset(enc, data.Batches(2, seed=5, flip=False,
                                                               caption_dropout=0.5), 0, 40))
    drops = data.caption_drops(5, 0, 40, 2, 0.5)
    rows, _ = data.batch_plan(len(enc.splits["train"]), 2, 5, 0, 40, False)
    for step, b in enumerate(batches_):
        for j in range(2):
            want = 3 if drops[step, j] else enc.caption_index[enc.splits["train"][rows[step, j]]]
            np.testing.assert_array_equal(b["context"][j].numpy(), enc.contexts[want])
    assert 0 < drops.mean() < 1


def diffusers_decays(decay, steps):
    """diffusers' EMAModel.get_decay at each of its step() calls, from its own code."""
    import torch
    from diffusers.training_utils import EMAModel

    ema = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=decay)
    out = []
    for _ in range(steps):
        ema.step([torch.nn.Parameter(torch.zeros(1))])
        out.append(ema.cur_decay_value)
    return out


def test_ema_decay_is_diffusers_warm_up_in_closed_form():
    for decay in (0.999, 0.9999, 0.8):
        k = np.arange(20000)
        ours = np.asarray(tr.ema_decay_at(k, decay))
        closed = np.where(k == 0, 0.0, np.minimum(decay, (1 + k) / (10 + k)))
        np.testing.assert_allclose(ours, closed, rtol=1e-7, atol=0)
        np.testing.assert_allclose(ours[:300], diffusers_decays(decay, 300), rtol=1e-7, atol=0)
    # 0.999 is reached at step 8990, where (1 + k) / (10 + k) = 8991 / 9000
    d = np.asarray(tr.ema_decay_at(np.arange(8984, 9000), 0.999))
    assert (d[:6] < np.float32(0.999)).all() and (d[6:] == np.float32(0.999)).all()
    # the initial LoRA's weight in the average after 300 steps: 74% at a constant 0.999,
    # 3% with the warm-up (prod over k of the decays)
    assert 0.999 ** 300 == pytest.approx(0.741, abs=1e-3)
    assert np.prod(np.asarray(tr.ema_decay_at(np.arange(1, 300), 0.999), np.float64)) < 0.04


def fit_recording(t, steps, n=4, batch=4, callbacks=()):
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, b, logs=None):
            seen.append([v.numpy().copy() for v in t.trainable_variables])

    t.fit(batches(n=n, batch=batch).repeat(), epochs=1, steps_per_epoch=steps, verbose=0,
          shuffle=False, callbacks=[Record(), *callbacks])
    return seen


def ema_trainer(decay, grad_accum=1):
    t, layers = make()
    opt = tr.make_optimizer(TrainConfig(learning_rate=1e-3, weight_decay=0.01, grad_clip=1.0,
                                        ema_decay=decay, grad_accum=grad_accum), 100, "float32")
    t.compile(optimizer=opt, jit_compile=False)
    t.optimizer.build(t.trainable_variables)
    return t


def test_ema_follows_diffusers_emamodel_step_for_step():
    import torch
    from diffusers.training_utils import EMAModel

    decay = 0.999
    t = ema_trainer(decay)
    initial = [v.numpy().copy() for v in t.trainable_variables]
    seen = fit_recording(t, 12, callbacks=[KeepRawWeights()])  # as run.train fits
    # diffusers: EMAModel over the same parameters, stepped after each optimizer step
    params = [torch.nn.Parameter(torch.tensor(v)) for v in initial]
    ema = EMAModel(params, decay=decay)
    for values in seen:
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(torch.tensor(v))
        ema.step(params)
    # and the closed form, in float64
    expected = [x.astype(np.float64) for x in seen[0]]
    for k, values in enumerate(seen[1:], start=1):
        d = min(decay, (1 + k) / (10 + k))
        expected = [d * a + (1 - d) * v for a, v in zip(expected, values)]
    raw = [v.numpy().copy() for v in t.trainable_variables]
    with tr.ema_weights(t.optimizer, t.trainable_variables):
        for v, s, e in zip(t.trainable_variables, ema.shadow_params, expected):
            np.testing.assert_allclose(v.numpy(), s.numpy(), rtol=1e-6, atol=1e-8)
            np.testing.assert_allclose(v.numpy(), e, rtol=1e-6, atol=1e-8)
    for v, r in zip(t.trainable_variables, raw):  # the raw weights are back after the block
        np.testing.assert_array_equal(v.numpy(), r)
    # with the warm-up the average has left the start: a constant 0.999 would sit at 99% of it
    assert any(not np.allclose(e, r) for e, r in zip(expected, raw))
    moved = [np.abs(e - i).max() / np.abs(r - i).max() for e, r, i in zip(expected, raw, initial)
             if np.abs(r - i).max() > 0]
    assert min(moved) > 0.3


def test_ema_moves_once_per_optimizer_step_under_accumulation():
    decay = 0.999
    t = ema_trainer(decay, grad_accum=2)
    seen = fit_recording(t, 8, batch=2, callbacks=[KeepRawWeights()])
    updates = seen[1::2]  # the micro-batches that apply
    for a, b in zip(seen[1::2], seen[2::2]):  # a micro-batch that only accumulates
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
    expected = [x.astype(np.float64) for x in updates[0]]
    for k, values in enumerate(updates[1:], start=1):
        d = min(decay, (1 + k) / (10 + k))
        expected = [d * a + (1 - d) * v for a, v in zip(expected, values)]
    with tr.ema_weights(t.optimizer, t.trainable_variables):
        for v, e in zip(t.trainable_variables, expected):
            np.testing.assert_allclose(v.numpy(), e, rtol=1e-6, atol=1e-8)
    assert int(t.optimizer.iterations.numpy()) == 4


OPTIONS = ["train.snr_gamma=5", "train.noise_offset=0.05", "train.caption_dropout=0.2",
           "train.ema_decay=0.999", "lora.init=gaussian", "train.mask_background_weight=0.1",
           "train.mask_normalize=true", "lora.type=dora"]


def test_all_options_on_resume_bit_exact(tmp_path, demo_captions, encoder_cache, build):  # noqa: F811
    straight = train(config(tmp_path, demo_captions, encoder_cache, *OPTIONS, name="straight"), build)
    assert straight["options"] == {"snr_gamma": 5.0, "noise_offset": 0.05, "caption_dropout": 0.2,
                                   "ema_decay": 0.999, "mask_background_weight": 0.1,
                                   "mask_normalize": True}
    # DoRA: a magnitude per output channel beside A and B, in the checkpoint and the train state
    last = load_file(str(tmp_path / "straight/checkpoints/last.lora.safetensors"))
    assert any(k.endswith(".dora_m") for k in last)
    # the bundled photos: a garment on a plain background, masked; counted in run.json
    rows = straight["train_images"]  # the training photos'
    assert straight["masks"]["photos"] == rows and straight["masks"]["masked"] >= rows - 8
    assert 0.1 < straight["masks"]["garment_share"] < 0.9
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
    from fashion_sd.sd.lora_file import read as read_lora

    assert read_lora(ck / "last.lora.safetensors")[1]["weights"] == "ema"
    assert sorted(p.name for p in (ck / "raw").iterdir()) == sorted(
        p.name for p in ck.glob("*.lora.safetensors"))
