"""CMMD, PRDC, bootstrap intervals and reliability notes against the references' own code
(clip-mmd's port of the paper's ``mmd``, the ``prdc`` package) and against closed forms."""

import warnings

import numpy as np
import pytest

from fashion_sd.evaluation import distances
from fashion_sd.evaluation.distances import (
    CMMD_SCALE,
    CMMD_SIGMA,
    PRDC_REFERENCE_IMAGES,
    bootstrap_interval,
    cmmd,
    cmmd_bias_bound,
    frechet_distance_of_features,
    l2_normalise,
    prdc,
    reliability_note,
)
from fashion_sd.evaluation.fid import (
    FID_MIN_IMAGES,
    feature_stats,
    frechet_distance,
    warn_if_biased,
)

# CMMD values are O(1); float64 sums over ~1e6 kernel values keep ~1e-13 of them.
CMMD_TOL = 1e-9


def embeddings(rng, n, d=64, shift=0.0):
    """Raw (unnormalised) embeddings: a shared direction plus noise, like CLIP's, which all sit
    in one cone of the sphere; ``shift`` moves the cone's axis sideways (+-shift per coordinate,
    orthogonal to the shared direction, so it survives normalisation)."""
    sideways = shift * np.where(np.arange(d) % 2 == 0, 1.0, -1.0)
    return 3.0 + sideways + rng.standard_normal((n, d))


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# --------------------------------------------------------------------------------------------
# CMMD: the reference's own code


@pytest.mark.parametrize("n_real,n_gen,shift", [(120, 120, 0.0), (150, 90, 0.4), (64, 200, 2.0)])
def test_cmmd_equals_clip_mmd(n_real, n_gen, shift):
    # clip-mmd's calculation.mmd is the paper's JAX mmd (google-research cmmd/distance.py)
    # ported line for line to torch; float64 numpy in, float64 torch arithmetic.
    calculation = pytest.importorskip("clip_mmd.calculation")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(n_real + n_gen)
    x, y = embeddings(rng, n_real), embeddings(rng, n_gen, shift=shift)
    # The paper's embedder normalises (scenic CLIP, normalize=True); its mmd does not.
    xn, yn = l2_normalise(x), l2_normalise(y)
    ours = cmmd(x, y)
    assert ours == pytest.approx(float(calculation.mmd(xn, yn)), abs=CMMD_TOL, rel=1e-9)
    low_mem = calculation.mmd_efficient(xn, yn, precision=torch.float64, low_mem=True,
                                        coeff_bs=37)
    assert ours == pytest.approx(low_mem, abs=CMMD_TOL, rel=1e-9)
    assert (distances.CMMD_SIGMA, distances.CMMD_SCALE) == (calculation._SIGMA,
                                                            calculation._SCALE)


def test_cmmd_blocks_give_the_whole_sum(monkeypatch):
    rng = np.random.default_rng(3)
    x, y = embeddings(rng, 103), embeddings(rng, 57, shift=0.5)
    whole = cmmd(x, y)
    monkeypatch.setattr(distances, "_BLOCK_ELEMENTS", 7 * 103)  # 7-row blocks, a ragged last
    assert cmmd(x, y) == pytest.approx(whole, abs=CMMD_TOL)


# --------------------------------------------------------------------------------------------
# CMMD: closed forms of the definition


def test_cmmd_of_identical_sets_is_zero():
    rng = np.random.default_rng(4)
    x = embeddings(rng, 200, d=768)
    assert abs(cmmd(x, x.copy())) <= CMMD_TOL


def test_cmmd_normalises_its_inputs():
    rng = np.random.default_rng(5)
    x, y = embeddings(rng, 80), embeddings(rng, 60, shift=1.0)
    lengths = rng.uniform(0.1, 10.0, (80, 1))
    assert cmmd(x * lengths, 7.0 * y) == pytest.approx(cmmd(x, y), abs=CMMD_TOL)


@pytest.mark.parametrize("angle", [0.05, 0.7, 2.0, np.pi])
@pytest.mark.parametrize("sigma,scale", [(CMMD_SIGMA, CMMD_SCALE), (0.5, 1.0)])
def test_cmmd_between_point_masses(angle, sigma, scale):
    # n copies of a against m copies of b: every k(x, x') = k(y, y') = 1 and k(x, y) = k(a, b).
    a, b = np.array([1.0, 0.0, 0.0]), np.array([np.cos(angle), np.sin(angle), 0.0])
    k_ab = np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))
    got = cmmd(np.tile(5 * a, (9, 1)), np.tile(b, (4, 1)), sigma=sigma, scale=scale)
    assert got == pytest.approx(2 * scale * (1 - k_ab), rel=1e-12, abs=CMMD_TOL)


def test_cmmd_keeps_the_diagonal_terms():
    # {a, b} against {a, a}: the biased estimator (the paper's) gives scale (1 - k_ab) / 2; the
    # unbiased one, dropping the i = j pairs within each set, would give exactly 0.
    a, b = unit([1.0, 0.0]), unit([0.6, 0.8])
    k_ab = np.exp(-np.sum((a - b) ** 2) / (2 * CMMD_SIGMA**2))
    got = cmmd(np.stack([a, b]), np.stack([a, a]))
    assert got == pytest.approx(CMMD_SCALE * (1 - k_ab) / 2, rel=1e-12)


def test_cmmd_of_one_distribution_is_within_its_bias_bound():
    rng = np.random.default_rng(6)
    x, y = embeddings(rng, 300), embeddings(rng, 200)
    assert 0.0 < cmmd(x, y) <= cmmd_bias_bound(300, 200)
    assert cmmd(x, embeddings(rng, 200, shift=3.0)) > cmmd_bias_bound(300, 200)


@pytest.mark.parametrize("bad,match", [
    (lambda x: x[:, :10], "same network"),
    (lambda x: x[:1], "at least 2"),
    (lambda x: np.where(np.arange(x.shape[0])[:, None] == 3, np.nan, x), "NaN or inf in 1 of"),
    (lambda x: x[0], r"\(n_images, feature_dim\)"),
    (lambda x: np.zeros_like(x), "all-zero rows"),
])
def test_cmmd_rejects_bad_inputs(bad, match):
    x = embeddings(np.random.default_rng(7), 20)
    with pytest.raises(ValueError, match=match):
        cmmd(x, bad(x.copy()))


# --------------------------------------------------------------------------------------------
# PRDC


@pytest.mark.parametrize("n_real,n_fake,d,nearest_k,shift,spread", [
    (300, 300, 64, 5, 0.0, 1.0),
    (250, 180, 32, 5, 0.5, 1.3),
    (200, 260, 16, 3, 1.5, 0.7),
    (120, 90, 128, 1, 0.2, 1.0),
])
def test_prdc_equals_the_prdc_package(n_real, n_fake, d, nearest_k, shift, spread, capsys):
    reference = pytest.importorskip("prdc")
    rng = np.random.default_rng(n_real * d)
    real = rng.standard_normal((n_real, d))
    fake = shift + spread * rng.standard_normal((n_fake, d))
    ref = reference.compute_prdc(real, fake, nearest_k)
    got = prdc(real, fake, nearest_k)
    assert set(got) == set(ref)
    for name in ref:
        assert got[name] == pytest.approx(float(ref[name]), abs=1e-12), name
    assert 0 < got["precision"] < 1 and 0 < got["coverage"] < 1  # a case that tells apart


def test_prdc_blocks_give_the_whole_matrix(monkeypatch):
    rng = np.random.default_rng(8)
    real, fake = rng.standard_normal((97, 20)), 0.3 + rng.standard_normal((61, 20))
    whole = prdc(real, fake)
    monkeypatch.setattr(distances, "_BLOCK_ELEMENTS", 5 * 97)
    assert prdc(real, fake) == whole


def test_prdc_of_identical_sets():
    # Each fake sits on its own real point (distance 0 < radius), and each real ball holds itself
    # and its k - 1 nearer neighbours: density is exactly k / k.
    real = np.random.default_rng(9).standard_normal((150, 24))
    got = prdc(real, real.copy())
    assert got["precision"] == got["recall"] == got["coverage"] == 1.0
    assert got["density"] == pytest.approx(1.0, abs=1e-12)


def test_prdc_of_far_apart_sets_is_zero():
    rng = np.random.default_rng(10)
    real = rng.standard_normal((60, 8))
    got = prdc(real, 100.0 + rng.standard_normal((40, 8)))
    assert got == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_needs_more_images_than_k():
    rng = np.random.default_rng(11)
    real = rng.standard_normal((6, 4))
    assert set(prdc(real, rng.standard_normal((6, 4)), nearest_k=5)) == {
        "precision", "recall", "density", "coverage"}
    with pytest.raises(ValueError, match="5 images, this needs at least 6"):
        prdc(real, rng.standard_normal((5, 4)), nearest_k=5)
    with pytest.raises(ValueError, match="nearest_k"):
        prdc(real, real, nearest_k=0)
    with pytest.raises(ValueError, match="4-d and generated ones 3-d"):
        prdc(real, rng.standard_normal((6, 3)))


# --------------------------------------------------------------------------------------------
# Bootstrap intervals


def shifted_gaussians(rng, n, d=4, shift=1.0):
    return rng.standard_normal((n, d)), shift + rng.standard_normal((n, d))


def test_frechet_distance_of_features_is_fid_from_stats():
    real, generated = shifted_gaussians(np.random.default_rng(12), 500, d=16)
    assert frechet_distance_of_features(real, generated) == pytest.approx(
        frechet_distance(*feature_stats(real), *feature_stats(generated)), rel=1e-12)


@pytest.mark.parametrize("n_real, n_generated, d", [(40, 60, 256), (60, 40, 256), (30, 30, 31)])
def test_with_fewer_images_than_dimensions_the_distance_is_the_same(n_real, n_generated, d):
    """The few-images path (singular values of an n1 x n2 matrix) against the d x d one."""
    rng = np.random.default_rng(d)
    real = rng.standard_normal((n_real, d)) @ rng.standard_normal((d, d)) * 0.1
    generated = 0.3 + rng.standard_normal((n_generated, d))
    assert frechet_distance_of_features(real, generated) == pytest.approx(
        frechet_distance(*feature_stats(real), *feature_stats(generated)), rel=1e-9)


def test_bootstrap_is_seeded():
    real, generated = shifted_gaussians(np.random.default_rng(13), 300)
    first = bootstrap_interval(frechet_distance_of_features, real, generated, n_boot=30, seed=1)
    again = bootstrap_interval(frechet_distance_of_features, real, generated, n_boot=30, seed=1)
    other = bootstrap_interval(frechet_distance_of_features, real, generated, n_boot=30, seed=2)
    assert first == again
    assert (other.low, other.high) != (first.low, first.high)
    assert first.estimate == other.estimate == frechet_distance_of_features(real, generated)


def test_bootstrap_interval_holds_the_estimate_of_a_large_sample():
    real, generated = shifted_gaussians(np.random.default_rng(14), 4000)
    got = bootstrap_interval(frechet_distance_of_features, real, generated, n_boot=100)
    assert got.low < got.estimate < got.high
    assert got.low < got.mean < got.high and got.std > 0
    assert (got.n_boot, got.level) == (100, 0.95)


def test_bootstrap_interval_is_wider_for_fewer_images():
    real, generated = shifted_gaussians(np.random.default_rng(15), 4000)
    many = bootstrap_interval(frechet_distance_of_features, real, generated, n_boot=60)
    few = bootstrap_interval(frechet_distance_of_features, real[:250], generated[:250],
                             n_boot=60)
    assert few.high - few.low > 2 * (many.high - many.low)  # ~sqrt(16) expected
    assert few.std > 2 * many.std


def test_bootstrap_works_for_cmmd():
    rng = np.random.default_rng(16)
    x, y = embeddings(rng, 120, d=32), embeddings(rng, 100, d=32, shift=0.5)
    got = bootstrap_interval(cmmd, x, y, n_boot=20, seed=3)
    assert got.estimate == cmmd(x, y)
    assert 0 < got.low <= got.high and got.std > 0


def test_bootstrap_shifts_cmmd_of_one_distribution_upwards():
    # Resampled duplicates add i = j kernel terms: near CMMD 0 the replicates sit above the
    # full-set estimate, as bootstrap_interval's docstring says.
    rng = np.random.default_rng(18)
    got = bootstrap_interval(cmmd, embeddings(rng, 150, d=32), embeddings(rng, 150, d=32),
                             n_boot=20)
    assert got.estimate < got.low < got.mean


def test_bootstrap_rejects_bad_arguments():
    real, generated = shifted_gaussians(np.random.default_rng(17), 20)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_interval(cmmd, real, generated, n_boot=1)
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval(cmmd, real, generated, level=95)
    with pytest.raises(ValueError, match="NaN or inf on"):
        bootstrap_interval(lambda a, b: float("nan"), real, generated, n_boot=3)


# --------------------------------------------------------------------------------------------
# Reliability notes


@pytest.mark.parametrize("metric", ["fid", "fd_dinov2"])
def test_frechet_notes_agree_with_fid_warning(metric):
    for n_real, n_gen in [(FID_MIN_IMAGES, FID_MIN_IMAGES), (FID_MIN_IMAGES - 1, 5000),
                          (300, 300)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            biased = warn_if_biased(n_real, n_gen)
        note = reliability_note(metric, n_real, n_gen)
        assert (note is not None) == biased
        if note:
            assert f"{n_real} real and {n_gen} generated" in note


def test_cmmd_note_follows_the_bias_bound():
    assert reliability_note("kid", 10, 10) is None
    assert reliability_note("cmmd", 5000, 5000) is None
    note = reliability_note("CMMD", 100, 100)
    assert note is not None and f"{cmmd_bias_bound(100, 100):.2f}" in note
    for n in (300, 400, 1000):
        quiet = cmmd_bias_bound(n, n) <= distances.CMMD_BIAS_TOLERANCE
        assert (reliability_note("cmmd", n, n) is None) == quiet


@pytest.mark.parametrize("metric", ["prdc", "precision", "recall", "density", "coverage"])
def test_prdc_notes(metric):
    assert "not computable" in reliability_note(metric, 5, 500)
    assert "not computable" not in reliability_note(metric, 6, 500)
    assert reliability_note(metric, PRDC_REFERENCE_IMAGES, PRDC_REFERENCE_IMAGES) is None
    assert "not computable" in reliability_note(metric, 3, 500, nearest_k=3)


def test_unknown_metric_is_an_error():
    with pytest.raises(ValueError, match="unknown metric 'is'"):
        reliability_note("is", 100, 100)
    with pytest.raises(ValueError, match="positive"):
        reliability_note("fid", 0, 100)
