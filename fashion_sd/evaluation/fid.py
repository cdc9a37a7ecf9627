"""FID and KID from Inception features: pure numpy/scipy, no TensorFlow.

- FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
  Nash Equilibrium", https://arxiv.org/abs/1706.08500): the Fréchet distance between Gaussians
  fitted to the real and the generated features. It is biased upwards for small samples, so it
  only compares runs scored on the same number of images, and needs 2048 of them to be read
  against published numbers.
- KID (Bińkowski et al. 2018, "Demystifying MMD GANs", https://arxiv.org/abs/1801.01401): the
  unbiased MMD² with a cubic polynomial kernel, averaged over random subsets. It has no such
  bias, so it is the number to trust below 2048 images.

Real-image statistics depend only on the images, the network and the preprocessing; they are
computed once and cached (:func:`cached_stats`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import scipy.linalg

from fashion_sd.cache import cached, file_id

# Inception's pool_3 width: with fewer images the covariance is rank-deficient, and pytorch-fid
# and clean-fid recommend at least this many for FIDs comparable with the literature.
FID_MIN_IMAGES = 2048
STATS_VERSION = 3  # 2: real images through the training loader; 3: float32 always (an
# evaluation during a mixed-precision run once cached bfloat16 statistics)


class SmallSampleWarning(UserWarning):
    """Fewer images than FID needs to be unbiased; compare with KID instead."""


# --------------------------------------------------------------------------------------------
# FID


def _check_gaussian(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"mu{name} must be a vector (d,), got shape {mu.shape}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ValueError(f"sigma{name} must be ({d}, {d}) to match mu{name}, "
                         f"got shape {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"mu{name}/sigma{name} contain NaN or inf: the features were not finite")
    # eigh reads one triangle only; an asymmetric input would silently give another answer.
    scale = max(float(np.abs(sigma).max()), np.finfo(np.float64).tiny)
    if float(np.abs(sigma - sigma.T).max()) > 1e-8 * scale:
        raise ValueError(f"sigma{name} is not symmetric, so it is not a covariance matrix")
    return mu, sigma


def _psd_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off zeros set to 0.

    eigh returns a zero eigenvalue as +-(d eps lambda_max) noise, and sqrt magnifies that noise
    to sqrt(d eps lambda_max) per zero (the d - n + 1 zeros of a covariance from n < d samples
    would add ~1e-7 each); values under the tolerance numpy's matrix_rank uses become 0.
    """
    tol = w.shape[0] * np.finfo(np.float64).eps * float(np.abs(w).max(initial=0.0))
    return np.where(w > tol, w, 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

        d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})       (Heusel et al. 2017)

    S1 S2 is not symmetric, so pytorch-fid takes its general matrix square root (``sqrtm``, a
    complex Schur decomposition, with an imaginary-part check). Here the same trace comes from
    a symmetric matrix: S1 S2 = S1^{1/2} (S1^{1/2} S2 S1^{1/2}) S1^{-1/2} is similar to
    M = S1^{1/2} S2 S1^{1/2}, which is symmetric PSD, so

        tr((S1 S2)^{1/2}) = tr(M^{1/2}) = sum_i sqrt(lambda_i(M)).

    (For a singular S1 the identity holds by continuity.) Two symmetric eigendecompositions
    (``scipy.linalg.eigh``, of S1 and of M) give it in real arithmetic. The zero eigenvalues of
    rank-deficient covariances (fewer samples than dimensions) come out of eigh as +-round-off
    and are set to 0 before the square root (:func:`_psd_eigenvalues`): on such inputs this
    stays exact to ~1e-15 relative where ``sqrtm`` drifts by up to ~5e-7 at d = 256. It agrees
    with pytorch-fid's ``calculate_frechet_distance`` to 1e-6 relative on full-rank and
    rank-deficient inputs alike, and at d = 2048 it is several times faster (tests/evaluation/test_fid.py,
    benchmarks/fid.py).
    """
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "1")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the two feature sets have different dimensions: {mu1.shape[0]} and "
                         f"{mu2.shape[0]}; were they made by the same network?")
    # S1 = V diag(w) V^T, so M = V (D^1/2 V^T S2 V D^1/2) V^T: the same eigenvalues as the
    # bracket, which needs no S1^{1/2} matrix. "evd" (divide and conquer) is the fastest full
    # symmetric eigensolver here (0.8 s against 1.1 s for the default at d = 2048).
    w, v = scipy.linalg.eigh(sigma1, driver="evd")
    r = np.sqrt(_psd_eigenvalues(w))
    b = v.T @ sigma2 @ v
    m = r[:, None] * ((b + b.T) / 2) * r[None, :]  # symmetrized against matmul round-off
    lam = scipy.linalg.eigh(m, eigvals_only=True)
    tr_covmean = float(np.sqrt(_psd_eigenvalues(lam)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d), float64, of features (n, d), one row per image."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (n, d) with n >= 2 images, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def warn_if_biased(n_real: int, n_generated: int | None = None) -> bool:
    """Warn (and return True) when either image set is too small for an unbiased FID."""
    counts = {"real": n_real} if n_generated is None else {"real": n_real, "generated": n_generated}
    if min(counts.values()) >= FID_MIN_IMAGES:
        return False
    sizes = " and ".join(f"{n} {what}" for what, n in counts.items())
    warnings.warn(
        f"FID from {sizes} images is biased upwards (it needs at least {FID_MIN_IMAGES} each, the "
        f"feature dimension, to compare with published values); it only compares runs scored on "
        f"the same numbers of images. Use KID, which is unbiased at any sample size, to compare "
        f"checkpoints.", SmallSampleWarning, stacklevel=2)
    return True


# --------------------------------------------------------------------------------------------
# KID


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x·y / d + 1)³ for all row pairs: KID's kernel (clean-fid, torch-fidelity)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² of two samples of m rows each (Gretton et al. 2012, eq. 3):

        1/(m(m-1)) sum_{i!=j} [k(x_i, x_j) + k(y_i, y_j)] - 2/m² sum_{i,j} k(x_i, y_j)
    """
    m = x.shape[0]
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def kid_subset_size(n_a: int, n_b: int, requested: int = 1000) -> int:
    """KID's subset size for sets of ``n_a`` and ``n_b`` images.

    ``requested`` (clean-fid's and torch-fidelity's 1000) when the smaller set has more than that;
    below, half the smaller set (at least 2), so the random subsets differ and KID's standard
    deviation says something. clean-fid would use the whole set for every subset (std 0) and
    torch-fidelity refuses; the tables report the size used.
    """
    n = min(n_a, n_b)
    return requested if n > requested else max(2, n // 2)


def kid(feats_a, feats_b, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and standard deviation of the unbiased MMD² over subsets.

    Each of ``num_subsets`` subsets takes ``m = min(subset_size, n_a, n_b)`` rows of each set
    without replacement (``numpy.random.default_rng(seed)``, a then b, subset by subset), as in
    clean-fid and torch-fidelity (Bińkowski et al. 2018); the std is numpy's (ddof 0), as
    torch-fidelity reports it. When m equals both set sizes every subset is the whole set.
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (n, d) with the same d, got {a.shape} and {b.shape}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:  # the unbiased estimator divides by m - 1
        raise ValueError(f"KID needs subsets of at least 2 rows; got {a.shape[0]} and "
                         f"{b.shape[0]} rows and subset_size {subset_size}")
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for s in range(num_subsets):
        ia = rng.choice(a.shape[0], m, replace=False)
        ib = rng.choice(b.shape[0], m, replace=False)
        values[s] = mmd2_unbiased(a[ia], b[ib])
    return float(values.mean()), float(values.std())


# --------------------------------------------------------------------------------------------
# Real-image statistics, cached


def stats_key(paths, backend: str, preprocessing: str, size=None) -> dict:
    """What real-image stats depend on: each image (path, size, mtime), network, preprocessing,
    and the training size the images are loaded at."""
    return {"version": STATS_VERSION, "kind": "fid-stats", "backend": backend,
            "preprocessing": preprocessing, "size": size,
            "images": [file_id(str(p)) for p in paths]}


def cached_stats(folder: str | Path, key: dict, compute) -> dict:
    """{mu, sigma, features} for ``key`` (from :func:`stats_key`); ``compute()`` gives features.

    The features are stored in ``folder`` as an .npz named by a hash of the key, with the whole
    key inside; a file is reused only if its stored key equals ``key`` exactly (a changed image,
    another network or preprocessing all recompute). Mean and covariance are derived on load
    (about a second for thousands of images), so the file holds one array.
    """
    for field in ("kind", "backend", "preprocessing", "images"):
        if field not in key:
            raise ValueError(f"stats cache key lacks '{field}'; build it with stats_key()")

    def features():
        f = np.asarray(compute(), dtype=np.float64)
        if f.ndim != 2 or f.shape[0] != len(key["images"]):
            raise ValueError(f"compute() must return one feature row per image "
                             f"({len(key['images'])}), got shape {f.shape}")
        return f

    f = cached(folder, key, features)
    mu, sigma = feature_stats(f)
    return {"mu": mu, "sigma": sigma, "features": f}
