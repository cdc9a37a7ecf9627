"""The encoder cache in shards (issue 17): the real 64 px VAE and text encoder through
encode_dataset, shard size invisible in the result, an interrupted encoding resumed without
re-encoding, float16 moments and what they do to the loss."""

import numpy as np
import pytest

from fashion_sd.catalogue.captions import read_captions
from fashion_sd.config import DataConfig
from fashion_sd.sd import models
from fashion_sd.training import data
from fashion_sd.sd.diffusion import (
    add_noise,
    alphas_cumprod,
    sample_latents,
    timestep_embedding,
)

SOURCE = models.WeightsSource("random", "random", id="random-init(seed=0)")


@pytest.fixture(scope="module")
def comps(small_parts):
    return models.Components(SOURCE, 64, **small_parts)


@pytest.fixture(scope="module")
def table(demo_captions):
    return read_captions(demo_captions)


@pytest.fixture(scope="module")
def one_shard(comps, table, tmp_path_factory):
    return data.encode_dataset(table, comps, DataConfig(cache_dir=str(tmp_path_factory.mktemp("one")), resolution=64, shard_rows=4096))


def test_shard_size_changes_nothing(comps, table, one_shard, tmp_path):
    small = data.encode_dataset(table, comps, DataConfig(cache_dir=str(tmp_path), resolution=64, shard_rows=8))
    assert len(list(tmp_path.glob("images-*/shard-*.npy"))) == -(-len(table) // 8)
    np.testing.assert_array_equal(np.asarray(small.moments), np.asarray(one_shard.moments))
    np.testing.assert_array_equal(np.asarray(small.contexts), np.asarray(one_shard.contexts))
    rows, flips = np.array([3, 40, 17, 3]), np.array([1, 0, 0, 0])
    np.testing.assert_array_equal(small.moments[rows, flips], one_shard.moments[rows, flips])


def test_an_interrupted_encoding_resumes(comps, table, one_shard, tmp_path, monkeypatch):
    real = data.encode_images
    calls = []

    def disconnects_after_two(encoder, paths, *args, **kwargs):
        if len(calls) == 2:
            raise ConnectionError("Colab runtime disconnected")
        calls.append(len(paths))
        return real(encoder, paths, *args, **kwargs)

    monkeypatch.setattr(data, "encode_images", disconnects_after_two)
    with pytest.raises(ConnectionError):
        data.encode_dataset(table, comps, DataConfig(cache_dir=str(tmp_path), resolution=64, shard_rows=16))
    monkeypatch.setattr(data, "encode_images", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    resumed = data.encode_dataset(table, comps, DataConfig(cache_dir=str(tmp_path), resolution=64, shard_rows=16))
    assert calls == [16, 16, len(table) - 32]  # the third shard only, once
    np.testing.assert_array_equal(np.asarray(resumed.moments), np.asarray(one_shard.moments))


def test_float16_moments_and_the_loss(comps, table, one_shard, tmp_path):
    """float16 storage halves the cache; the latents it gives differ from float32's by float16
    rounding, and a training loss computed from them by under 1e-3 relative (measured here)."""
    half = data.encode_dataset(table, comps, DataConfig(cache_dir=str(tmp_path), resolution=64, cache_dtype="float16"))
    m32, m16 = np.asarray(one_shard.moments), np.asarray(half.moments)
    np.testing.assert_allclose(m16, m32, rtol=2 ** -10, atol=1e-4)
    files = lambda enc: sum(p.stat().st_size for p in enc.moments.folder.glob("shard-*"))  # noqa: E731
    assert files(half) < 0.55 * files(one_shard)
    import keras
    from tiny import tiny_unet

    keras.utils.set_random_seed(0)
    unet = tiny_unet(8)
    rng = np.random.default_rng(0)
    eps = rng.normal(size=m32[:, 0].shape[:-1] + (4,)).astype(np.float32)
    noise = rng.normal(size=eps.shape).astype(np.float32)
    t = rng.integers(0, 1000, len(eps)).astype(np.int32)
    context = np.asarray(one_shard.contexts)[one_shard.caption_index]
    table_ = alphas_cumprod()

    def loss(m):  # the epsilon loss of one step over the whole set, the same noise and model
        x = add_noise(sample_latents(m[:, 0], eps), noise, t, table_)
        pred = unet([x, timestep_embedding(t), keras.ops.convert_to_tensor(context)])
        return float(np.mean((np.asarray(pred, np.float64) - noise) ** 2))

    x16, x32 = (np.asarray(sample_latents(m[:, 0], eps)) for m in (m16, m32))
    latent_rel = float(np.sqrt(np.mean((x16 - x32) ** 2) / np.mean(x32 ** 2)))
    rel = abs(loss(m16) / loss(m32) - 1)
    print(f"float16 moments: latents change by {latent_rel:.2e} RMS (relative), the loss by {rel:.2e}")
    assert latent_rel < 1e-3 and rel < 1e-3
