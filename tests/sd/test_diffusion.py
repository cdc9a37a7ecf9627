"""The diffusion schedule (sd/diffusion.py) pinned to KerasCV's own sampler and to closed forms."""

import numpy as np
import pytest
from keras import ops

from fashion_sd.sd import diffusion


def test_schedule_is_the_samplers():
    from keras_cv.src.models.stable_diffusion.constants import _ALPHAS_CUMPROD

    ours = diffusion.alphas_cumprod()
    assert ours.shape == (1000,)
    np.testing.assert_allclose(ours, np.array(_ALPHAS_CUMPROD), atol=1e-6, rtol=0)


def test_kerascv_default_scheduler_does_not_match_its_sampler():
    # Why we do not use NoiseScheduler(): its default (linear 1e-4 -> 0.02) is another schedule.
    from keras_cv.models.stable_diffusion import NoiseScheduler

    default = ops.convert_to_numpy(NoiseScheduler().alphas_cumprod)
    assert np.abs(default - diffusion.alphas_cumprod()).max() > 0.1
    matching = NoiseScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    np.testing.assert_allclose(ops.convert_to_numpy(matching.alphas_cumprod),
                               diffusion.alphas_cumprod(), atol=1e-6)


def test_schedule_closed_form_ends():
    a = diffusion.alphas_cumprod()
    assert a[0] == pytest.approx(1 - 0.00085)
    assert np.all(np.diff(a) < 0)


def test_timestep_embedding_is_the_samplers_for_each_timestep():
    from keras_cv.src.models.stable_diffusion.stable_diffusion import (
        StableDiffusionBase,
    )

    ts = np.array([0, 1, 37, 500, 999], dtype=np.int32)
    ours = ops.convert_to_numpy(diffusion.timestep_embedding(ts))
    assert ours.shape == (5, 320)
    for i, t in enumerate(ts):
        ref = ops.convert_to_numpy(StableDiffusionBase._get_timestep_embedding(None, int(t), 1))
        np.testing.assert_array_equal(ours[i], ref[0])


def test_add_noise_closed_form():
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((3, 4, 4, 4)).astype("float32")
    eps = rng.standard_normal((3, 4, 4, 4)).astype("float32")
    t = np.array([0, 500, 999], dtype=np.int32)
    table = diffusion.alphas_cumprod().astype("float32")
    got = ops.convert_to_numpy(diffusion.add_noise(x0, eps, t, table))
    for i, ti in enumerate(t):
        a = table[ti]
        np.testing.assert_allclose(got[i], np.sqrt(a) * x0[i] + np.sqrt(1 - a) * eps[i], rtol=1e-6)


def test_sample_latents():
    rng = np.random.default_rng(1)
    mean = rng.standard_normal((2, 4, 4, 4)).astype("float32")
    logvar = rng.uniform(-3, 1, (2, 4, 4, 4)).astype("float32")
    moments = np.concatenate([mean, logvar], -1)
    zero = ops.convert_to_numpy(diffusion.sample_latents(moments, np.zeros_like(mean)))
    np.testing.assert_allclose(zero, mean * 0.18215, rtol=1e-6)
    eps = rng.standard_normal(mean.shape).astype("float32")
    got = ops.convert_to_numpy(diffusion.sample_latents(moments, eps))
    np.testing.assert_allclose(got, (mean + np.exp(0.5 * logvar) * eps) * 0.18215, rtol=1e-5)
