"""FID and KID numerics against closed forms and pytorch-fid; stats cache; Inception extractors."""

import json
import os
import urllib.error
import warnings

import numpy as np
import pytest
from PIL import Image
from reference_fid import reference_frechet_distance

from fashion_sd.evaluation import inception
from fashion_sd.evaluation.fid import (
    FID_MIN_IMAGES,
    SmallSampleWarning,
    cached_stats,
    feature_stats,
    frechet_distance,
    kid,
    stats_key,
    warn_if_biased,
)
from fashion_sd.evaluation.inception import (
    InceptionUnavailable,
    load_extractor,
    load_real_image,
    preprocess,
    real_image_features,
    untrained_extractor,
)


def random_spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


def random_orthogonal(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# --------------------------------------------------------------------------------------------
# FID: closed forms


def test_identical_gaussians_are_at_distance_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(32), random_spd(rng, 32)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) <= 1e-10 * np.trace(sigma)


def test_diagonal_covariances():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    s1, s2 = rng.uniform(0.1, 3, 20), rng.uniform(0.1, 3, 20)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("zeros", [0, 5])
def test_commuting_covariances(zeros):
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T: tr((S1 S2)^1/2) = sum sqrt(a b); a may have zeros."""
    rng = np.random.default_rng(2)
    d = 24
    q = random_orthogonal(rng, d)
    a, b = rng.uniform(0.2, 2, d), rng.uniform(0.2, 2, d)
    a[:zeros] = 0.0  # a rank-deficient S1
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    got = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("c", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("d, rank", [(40, None), (256, 10)])
def test_scaled_covariance(c, d, rank):
    """sigma2 = c² sigma1: (S1 S2)^1/2 = c S1, so d² = |dmu|² + tr(S1)(1 - c)².

    Rank 10 in 256 dimensions is the covariance of 11 images; pytorch-fid's sqrtm is off by
    1e-9 to 1e-7 relative on such inputs, the eigenvalue form by round-off only.
    """
    rng = np.random.default_rng(3)
    sigma = random_spd(rng, d, rank)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma) * (1 - c) ** 2
    got = frechet_distance(mu1, sigma, mu2, c**2 * sigma)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12 * np.trace(sigma))


def test_symmetric_in_its_arguments():
    rng = np.random.default_rng(4)
    m1, s1 = rng.standard_normal(16), random_spd(rng, 16)
    m2, s2 = rng.standard_normal(16), random_spd(rng, 16)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(frechet_distance(m2, s2, m1, s1),
                                                             rel=1e-10)


@pytest.mark.parametrize("args, match", [
    ((np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3)), "mu1 must be a vector"),
    ((np.zeros(3), np.eye(4), np.zeros(3), np.eye(3)), r"sigma1 must be \(3, 3\)"),
    ((np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), "different dimensions: 3 and 4"),
    ((np.zeros(3), np.eye(3), np.array([0, np.nan, 0]), np.eye(3)), "NaN or inf"),
    ((np.zeros(3), np.triu(np.ones((3, 3))), np.zeros(3), np.eye(3)), "sigma1 is not symmetric"),
])
def test_bad_shapes_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(*args)


def test_feature_stats_are_mean_and_unbiased_covariance():
    f = np.random.default_rng(5).standard_normal((7, 3))
    mu, sigma = feature_stats(f)
    centred = f - f.sum(axis=0) / 7
    expected = np.array([[sum(centred[k, i] * centred[k, j] for k in range(7)) / 6
                          for j in range(3)] for i in range(3)])
    np.testing.assert_allclose(mu, [f[:, i].sum() / 7 for i in range(3)], rtol=1e-14)
    np.testing.assert_allclose(sigma, expected, rtol=1e-12)
    assert mu.dtype == sigma.dtype == np.float64
    with pytest.raises(ValueError, match="n >= 2"):
        feature_stats(f[:1])


# --------------------------------------------------------------------------------------------
# FID: agreement with pytorch-fid's calculate_frechet_distance


@pytest.mark.parametrize("n, d", [(500, 64), (50, 64), (10, 256), (120, 256)])
def test_agrees_with_pytorch_fid(n, d):
    """Full-rank (n > d) and rank-deficient (n <= d) covariances, as from real features."""
    rng = np.random.default_rng(n + d)
    a = np.abs(rng.standard_normal((n, d)) @ rng.standard_normal((d, d))) / np.sqrt(d)
    b = np.abs(rng.standard_normal((n, d)) + 0.2)
    (m1, s1), (m2, s2) = feature_stats(a), feature_stats(b)
    ours, ref = frechet_distance(m1, s1, m2, s2), reference_frechet_distance(m1, s1, m2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)


def test_agrees_with_pytorch_fid_on_random_spd():
    rng = np.random.default_rng(6)
    for d in (8, 100):
        args = (rng.standard_normal(d), random_spd(rng, d),
                rng.standard_normal(d), random_spd(rng, d))
        assert frechet_distance(*args) == pytest.approx(reference_frechet_distance(*args), rel=1e-6)


# --------------------------------------------------------------------------------------------
# KID


def mmd2_by_definition(x, y):
    """Unbiased MMD², pair by pair, with k(u, v) = (u.v / d + 1)³ written out."""
    m, d = len(x), len(x[0])

    def k(u, v):
        return (sum(float(ui) * float(vi) for ui, vi in zip(u, v)) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (m * m)


def test_kid_on_whole_sets_is_the_unbiased_mmd():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((6, 5)), rng.standard_normal((6, 5)) + 0.7
    mean, std = kid(a, b, num_subsets=3, subset_size=6)
    assert mean == pytest.approx(mmd2_by_definition(a, b), rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)  # every subset is the whole set, reordered


def test_kid_subsets_follow_the_documented_draw():
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((9, 4)), rng.standard_normal((12, 4)) * 1.5
    draw = np.random.default_rng(11)
    values = []
    for _ in range(4):
        ia, ib = draw.choice(9, 5, replace=False), draw.choice(12, 5, replace=False)
        values.append(mmd2_by_definition(a[ia], b[ib]))
    mean, std = kid(a, b, num_subsets=4, subset_size=5, seed=11)
    assert mean == pytest.approx(np.mean(values), rel=1e-12)
    assert std == pytest.approx(np.std(values), rel=1e-10)


def test_kid_subset_size_is_capped_at_the_smaller_set():
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((5, 3)), rng.standard_normal((9, 3))
    assert kid(a, b, num_subsets=7, seed=3) == kid(a, b, num_subsets=7, subset_size=5, seed=3)
    with pytest.raises(ValueError, match="at least 2 rows"):
        kid(a[:1], b)
    with pytest.raises(ValueError, match="at least 2 rows"):
        kid(a, b, subset_size=1)
    with pytest.raises(ValueError, match="same d"):
        kid(a, b[:, :2])


def test_kid_is_deterministic_per_seed():
    rng = np.random.default_rng(10)
    a, b = rng.standard_normal((40, 6)), rng.standard_normal((50, 6))
    def run(seed):
        return kid(a, b, num_subsets=5, subset_size=10, seed=seed)

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_kid_is_near_zero_for_one_distribution():
    rng = np.random.default_rng(12)
    a, b = rng.standard_normal((300, 16)), rng.standard_normal((300, 16))
    shifted = rng.standard_normal((300, 16)) + 0.5
    same, _ = kid(a, b, subset_size=100)
    other, _ = kid(a, shifted, subset_size=100)
    assert other > 0 and abs(same) < 0.05 * other


# --------------------------------------------------------------------------------------------
# Small-sample warning


def test_warns_below_2048_images_and_points_to_kid():
    with pytest.warns(SmallSampleWarning, match="Use KID"):
        assert warn_if_biased(FID_MIN_IMAGES - 1)
    with pytest.warns(SmallSampleWarning, match=f"{FID_MIN_IMAGES} real and 85 generated"):
        assert warn_if_biased(FID_MIN_IMAGES, 85)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_biased(FID_MIN_IMAGES)
        assert not warn_if_biased(FID_MIN_IMAGES, FID_MIN_IMAGES + 1)


# --------------------------------------------------------------------------------------------
# Real-image stats cache


@pytest.fixture
def real_images(tmp_path):
    paths = []
    for i in range(4):
        p = tmp_path / "images" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (6 + i, 8), (10 * i, 20, 30)).save(p)
        paths.append(p)
    return paths


def test_stats_cache_hits_and_recomputes(tmp_path, real_images):
    calls = []

    def compute():
        calls.append(1)
        return np.random.default_rng(len(calls)).standard_normal((len(real_images), 8))

    folder = tmp_path / "cache"
    key = stats_key(real_images, "backend-a", "prep-1")
    first = cached_stats(folder, key, compute)
    again = cached_stats(folder, stats_key(real_images, "backend-a", "prep-1"), compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(again["features"], first["features"])
    f = first["features"]
    np.testing.assert_allclose(first["mu"], f.sum(axis=0) / len(f), rtol=1e-13)
    np.testing.assert_allclose(first["sigma"], (f - f.mean(0)).T @ (f - f.mean(0)) / (len(f) - 1),
                               rtol=1e-12)
    (stored,) = folder.glob("*.npz")
    with np.load(stored) as z:
        assert json.loads(str(z["key"])) == key  # the whole key is inside the file

    cached_stats(folder, stats_key(real_images, "backend-b", "prep-1"), compute)
    assert len(calls) == 2
    cached_stats(folder, stats_key(real_images, "backend-a", "prep-2"), compute)
    assert len(calls) == 3
    st = os.stat(real_images[2])
    os.utime(real_images[2], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    changed = cached_stats(folder, stats_key(real_images, "backend-a", "prep-1"), compute)
    assert len(calls) == 4
    assert not np.array_equal(changed["features"], first["features"])


def test_stats_cache_rejects_wrong_feature_rows(tmp_path, real_images):
    key = stats_key(real_images, "b", "p")
    with pytest.raises(ValueError, match="one feature row per image"):
        cached_stats(tmp_path, key, lambda: np.zeros((len(real_images) + 1, 8)))


# --------------------------------------------------------------------------------------------
# Inception feature extractors


@pytest.fixture(scope="module")
def untrained():
    return untrained_extractor()


@pytest.mark.parametrize("protocol", inception.PROTOCOLS)
def test_preprocess_gives_299_in_range(protocol):
    img = np.random.default_rng(13).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    img[0, 0], img[0, 1] = 0, 255
    x = preprocess(img, protocol).numpy()
    assert x.shape == (1, 299, 299, 3) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 127 / 128


@pytest.mark.parametrize("protocol", inception.PROTOCOLS)
@pytest.mark.parametrize("size", [(50, 70), (600, 450)])
@pytest.mark.parametrize("colour", [0, 37, 255])
def test_constant_image_stays_constant(size, colour, protocol):
    x = preprocess(np.full((*size, 3), colour, np.uint8), protocol).numpy()
    np.testing.assert_allclose(x, (colour - 128) / 128, atol=1e-5)


def test_clean_downsizing_is_antialiased_and_tensorflows_is_not():
    """A 1-pixel checkerboard shrunk 3x: PIL's bicubic filter greys it; TensorFlow's bilinear
    resizes (2's and 1's) without antialiasing sample it."""
    board = (np.indices((897, 897)).sum(axis=0) % 2 * 255).astype(np.uint8)
    board = np.repeat(board[..., None], 3, axis=-1)
    assert np.abs(preprocess(board, "clean").numpy()).max() < 0.5
    assert np.abs(preprocess(board, "tensorflow2").numpy()).max() > 0.9
    assert np.abs(preprocess(board, "tensorflow1").numpy()).max() > 0.9


def test_preprocess_rejects_float_images():
    with pytest.raises(ValueError, match="uint8 RGB"):
        preprocess(np.zeros((8, 8, 3), np.float32))


def test_untrained_features_from_images_of_any_size(untrained):
    rng = np.random.default_rng(14)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
              for h, w in [(40, 30), (64, 64), (90, 120)]]
    f = untrained(images, batch_size=2)
    assert f.shape == (3, 2048) and f.dtype == np.float64 and np.isfinite(f).all()
    assert not untrained.comparable and untrained.name.startswith("untrained:")
    assert untrained.preprocessing == inception.PREPROCESSING.format(protocol="clean")
    # each image's features depend on that image only: batching changes nothing
    one_by_one = np.concatenate([untrained([im]) for im in images])
    np.testing.assert_allclose(f, one_by_one, rtol=1e-4, atol=1e-4 * np.abs(f).max())
    assert np.abs(f[0] - f[1]).max() > 1e-3 * np.abs(f).max()


def test_array_and_list_inputs_agree(untrained):
    batch = np.random.default_rng(15).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(untrained(batch), untrained(list(batch)), rtol=1e-5, atol=1e-9)


def test_real_images_go_through_the_training_loader(tmp_path, untrained):
    from fashion_sd.images import load_image

    pixels = np.random.default_rng(16).integers(0, 256, (80, 60, 3), dtype=np.uint8)
    pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1] = 250, 250, 250, 250  # a white backdrop
    Image.fromarray(pixels).save(tmp_path / "p.png")
    for resolution, shape in ((64, (64, 64, 3)), ([48, 64], (64, 48, 3))):
        out = load_real_image(tmp_path / "p.png", resolution)
        assert out.shape == shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out, load_image(tmp_path / "p.png", resolution))
    f = real_image_features(untrained, [tmp_path / "p.png"] * 3, 64, batch_size=2)
    assert f.shape == (3, 2048)


def test_tfhub_offline_says_what_to_download(monkeypatch):
    import tensorflow_hub

    def offline(*_, **__):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tensorflow_hub, "load", offline)
    with pytest.raises(InceptionUnavailable, match="tf-hub-format=compressed") as info:
        load_extractor("tfhub")
    assert "URLError" in str(info.value) and "eval.inception_weights: DIR" in str(info.value)
    with pytest.raises(InceptionUnavailable, match="not found"):
        load_extractor("tfhub", weights="/nonexistent/inception-module")


def test_keras_missing_weights_file_says_where_to_get_it():
    with pytest.raises(InceptionUnavailable, match="notop.h5") as info:
        load_extractor("keras", weights="/nonexistent/inception_notop.h5")
    assert "/nonexistent/inception_notop.h5" in str(info.value)


@pytest.mark.parametrize("form", ["callable", "signature"])
def test_tfhub_module_from_a_local_folder(tmp_path, form):
    """Stand-ins returning {'logits', 'pool_3'}: callable like TF-GAN's test module, or with a
    signature only, as a TF1-format module loads; pool_3 comes as (b, 1, 1, 2048)."""
    import tensorflow as tf

    def fake_inception(x):
        mean = tf.reduce_mean(x, axis=[1, 2, 3])
        pool = tf.reshape(mean, (-1, 1, 1, 1)) * tf.ones((1, 1, 1, 2048))
        return {"logits": tf.zeros((tf.shape(x)[0], 1008)), "pool_3": pool}

    module = tf.Module()
    fn = tf.function(fake_inception, input_signature=[tf.TensorSpec(None, tf.float32)])
    if form == "callable":
        module.__call__ = fn
        tf.saved_model.save(module, str(tmp_path / "module"))
    else:
        module.f = fn
        tf.saved_model.save(module, str(tmp_path / "module"),
                            signatures={"default": fn.get_concrete_function()})
    ex = load_extractor("tfhub", weights=str(tmp_path / "module"))
    assert ex.comparable and ex.name.startswith("tfhub:")
    colours = [0, 100, 255]
    f = ex([np.full((20 + c // 10, 30, 3), c, np.uint8) for c in colours])
    expected = np.repeat((np.array(colours, float)[:, None] - 128) / 128, 2048, axis=1)
    np.testing.assert_allclose(f, expected, atol=1e-5)


def test_auto_falls_back_to_untrained_loudly(monkeypatch, untrained):
    def unavailable(*_):
        raise InceptionUnavailable("offline")

    monkeypatch.setattr(inception, "_load_tfhub", unavailable)
    monkeypatch.setattr(inception, "_load_keras", unavailable)
    monkeypatch.setattr(inception, "untrained_extractor", lambda protocol: untrained)
    with pytest.warns(UserWarning, match="RANDOM-INIT"):
        ex = load_extractor("auto")
    assert ex is untrained and not ex.comparable


def test_backend_choice_is_checked():
    with pytest.raises(ValueError, match="tfhub, keras or auto"):
        load_extractor("inception")
    with pytest.raises(ValueError, match="not auto"):
        load_extractor("auto", weights="/some/file.h5")


def test_the_untrained_network_is_the_same_in_every_process():
    """The offline demo's FID/KID repeat from one process to the next (a sweep's runs, a
    distributed sweep against a serial one): the untrained weights are seeded."""
    import subprocess
    import sys

    code = "from fashion_sd.evaluation.inception import untrained_extractor as u; print(u().name)"
    names = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip() for _ in range(2)}
    assert len(names) == 1 and names.pop().startswith("untrained:")
