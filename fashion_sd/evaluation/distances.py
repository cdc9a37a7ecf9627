"""The feature-space distances beside FID and KID: CMMD, precision/recall/density/coverage, and
bootstrap intervals that say whether two checkpoints differ. Pure numpy/scipy, no network.

- CMMD (Jayasumana et al., CVPR 2024, "Rethinking FID", https://arxiv.org/abs/2401.09603): the
  MMD² with a Gaussian RBF kernel between CLIP image embeddings. It assumes no normal
  distribution, so it needs far fewer images than FID.
- Precision, recall, density, coverage (Naeem et al., ICML 2020, "Reliable Fidelity and
  Diversity Metrics for Generative Models", https://arxiv.org/abs/2002.09797): fidelity and
  diversity apart, from k-nearest-neighbour balls around the feature vectors.
- :func:`bootstrap_interval`: the spread of any of these (and of FID / FD-DINOv2, through
  :func:`frechet_distance_of_features`) over resampled image sets.
- :func:`reliability_note`: the caveat a table prints beside a metric computed on few images.

FID's own numerics live in :mod:`fashion_sd.evaluation.fid`; nothing here duplicates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.spatial.distance import cdist

from fashion_sd.evaluation.fid import FID_MIN_IMAGES, feature_stats, frechet_distance

# The paper's bandwidth and its scale "to make the metric more human readable"
# (google-research/google-research cmmd/distance.py: _SIGMA, _SCALE).
CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
# A worst-case bias above this many CMMD units earns a note (the project's choice: a tenth of a
# unit, where the paper prints three decimals).
CMMD_BIAS_TOLERANCE = 0.1
# Naeem et al.'s k, also the one Stein et al. (NeurIPS 2023) report with DINOv2 features.
PRDC_NEAREST_K = 5
# prdc's own example scores 10,000 real against 10,000 generated vectors with k = 5; the k-NN
# radii shrink as sets grow, so every PRDC number depends on the set sizes.
PRDC_REFERENCE_IMAGES = 10_000
# Pairwise blocks hold at most this many float64 entries (32 MiB): CMMD and PRDC on 10,000 x
# 768 features stay far below the 800 MB a full 10,000 x 10,000 matrix would take.
_BLOCK_ELEMENTS = 1 << 22

Metric = Callable[[np.ndarray, np.ndarray], float]


# --------------------------------------------------------------------------------------------
# Input checks


def _as_features(x, name: str, min_rows: int = 2) -> np.ndarray:
    f = np.asarray(x, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"{name} must be (n_images, feature_dim), got shape {f.shape}; "
                         f"stack one feature row per image")
    if f.shape[0] < min_rows:
        raise ValueError(f"{name} has {f.shape[0]} images, this needs at least {min_rows}; "
                         f"score more images")
    if not np.isfinite(f).all():
        bad = int((~np.isfinite(f).all(axis=1)).sum())
        raise ValueError(f"{name} has NaN or inf in {bad} of {f.shape[0]} rows: the features "
                         f"were not finite (a diverged network, or a failed image load)")
    return f


def _feature_pair(real, generated, min_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    r = _as_features(real, "real features", min_rows)
    g = _as_features(generated, "generated features", min_rows)
    if r.shape[1] != g.shape[1]:
        raise ValueError(f"real features are {r.shape[1]}-d and generated ones "
                         f"{g.shape[1]}-d; both sets must come from the same network and layer")
    return r, g


def _block_rows(n_cols: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, n_cols))


# --------------------------------------------------------------------------------------------
# CMMD


def l2_normalise(embeddings: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """Rows scaled to unit length, in float64: CLIP's image embeddings as CMMD reads them.

    The paper's embedder (scenic's CLIP, called with its default ``normalize=True``) returns
    unit vectors and its ``mmd`` does not normalise again; normalising here makes the same
    number come out whether a caller passes raw or normalised CLIP embeddings.
    """
    e = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} has {int((norms == 0).sum())} all-zero rows, which have no "
                         f"direction to normalise; check the embedder's output")
    return e / norms


def rbf_kernel_mean(x: np.ndarray, y: np.ndarray, sigma: float = CMMD_SIGMA) -> float:
    """Mean of exp(-|x_i - y_j|² / (2 sigma²)) over all n_x * n_y pairs, diagonal included.

    Squared distances come from |x|² + |y|² - 2 x·y rather than ``cdist``: the matrix product
    runs on BLAS, several times faster at 768-d, and on unit vectors its cancellation error
    (~1e-16) is far below what the kernel can resolve. Rows of x go in blocks so memory stays
    bounded whatever the set sizes.
    """
    gamma = 1.0 / (2.0 * sigma * sigma)
    sq_x = np.einsum("ij,ij->i", x, x)
    sq_y = np.einsum("ij,ij->i", y, y)
    step = _block_rows(y.shape[0])
    total = 0.0
    for start in range(0, x.shape[0], step):
        block = x[start:start + step] @ y.T
        block *= -2.0
        block += sq_x[start:start + step, None]
        block += sq_y[None, :]
        np.maximum(block, 0.0, out=block)  # round-off can leave -1e-16 where x_i == y_j
        block *= -gamma
        np.exp(block, out=block)
        total += float(block.sum())
    return total / (x.shape[0] * y.shape[0])


def cmmd(real_embeddings, generated_embeddings, sigma: float = CMMD_SIGMA,
         scale: float = CMMD_SCALE) -> float:
    """CMMD: ``scale`` times the squared MMD between the two sets of CLIP image embeddings.

        CMMD = scale * (mean k(x, x') + mean k(y, y') - 2 mean k(x, y)),
        k(a, b) = exp(-|a - b|² / (2 sigma²))

    each mean over all pairs of rows, the i = j terms included: the biased (minimum-variance)
    estimator of Gretton et al. 2012, eq. 5, which is what the paper's published ``mmd``
    computes, although its abstract calls CMMD unbiased. It is never negative and has a small
    upward bias, at most ``scale (1 - exp(-2 / sigma²)) (1/n_real + 1/n_generated)`` on unit
    vectors (:func:`cmmd_bias_bound`). No square root is taken: the paper reports MMD².

    Inputs are L2-normalised here (:func:`l2_normalise`), as the paper's CLIP embeddings are,
    so raw and normalised embeddings give the same number. Float64 throughout; memory is
    bounded by blocks (:func:`rbf_kernel_mean`): 10,000 x 768 per set takes three 10,000 x
    10,000 kernel sums, about 4.6e11 flops.
    """
    x, y = _feature_pair(real_embeddings, generated_embeddings)
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    x = l2_normalise(x, "real embeddings")
    y = l2_normalise(y, "generated embeddings")
    k_xx = rbf_kernel_mean(x, x, sigma)
    k_yy = rbf_kernel_mean(y, y, sigma)
    k_xy = rbf_kernel_mean(x, y, sigma)
    return float(scale * (k_xx + k_yy - 2.0 * k_xy))


def cmmd_bias_bound(n_real: int, n_generated: int, sigma: float = CMMD_SIGMA,
                    scale: float = CMMD_SCALE) -> float:
    """Largest upward bias CMMD's biased estimator can have with these set sizes.

    The i = j terms add (1 - mean off-diagonal kernel) / n per set; on unit vectors distances
    are at most 2, so each kernel is at least exp(-2 / sigma²). Real CLIP embeddings are closer
    than antipodal, so the actual bias is a fraction of this.
    """
    return float(scale * (1.0 - np.exp(-2.0 / sigma**2)) * (1.0 / n_real + 1.0 / n_generated))


# --------------------------------------------------------------------------------------------
# Precision, recall, density, coverage


def knn_radii(features: np.ndarray, nearest_k: int) -> np.ndarray:
    """Distance from each row to its ``nearest_k``-th nearest other row (NND_k in Naeem et al.).

    Position ``nearest_k`` of each sorted row of distances, position 0 being the row itself,
    as prdc takes it. Blocks of ``cdist`` rather than ``scipy.spatial.cKDTree``: in hundreds
    of dimensions a k-d tree visits nearly every point anyway, and cdist's direct differences
    are exact where a tree would add nothing but overhead.
    """
    step = _block_rows(features.shape[0])
    radii = np.empty(features.shape[0])
    for start in range(0, features.shape[0], step):
        d = cdist(features[start:start + step], features)
        radii[start:start + step] = np.partition(d, nearest_k, axis=1)[:, nearest_k]
    return radii


def prdc(real_features, fake_features, nearest_k: int = PRDC_NEAREST_K) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake_features`` against ``real_features``.

    Naeem et al. 2020, with B(x, r) the open ball and NND_k the k-th neighbour distance:

    - precision: share of fakes inside some real ball B(x_i, NND_k(x_i))
    - recall: share of reals inside some fake ball B(y_j, NND_k(y_j))
    - density: real balls containing each fake, averaged over fakes and divided by k
    - coverage: share of real balls containing at least one fake

    The same numbers as the ``prdc`` package's ``compute_prdc`` (strict ``<`` for "inside"),
    computed in float64 in blocks of real rows so that 10,000 x 10,000 distance matrices are
    never held whole. Two large samples of one distribution give density ~1 and coverage
    ~1 - 2^-k, while precision and recall fall with the dimension (prdc's README: ~0.48 at
    1000-d); one set against itself gives 1, 1, 1, 1 (ties aside).
    """
    if nearest_k < 1:
        raise ValueError(f"nearest_k must be >= 1, got {nearest_k}")
    real, fake = _feature_pair(real_features, fake_features, min_rows=nearest_k + 1)
    real_radii = knn_radii(real, nearest_k)
    fake_radii = knn_radii(fake, nearest_k)
    fakes_in_real_balls = np.zeros(fake.shape[0], dtype=np.int64)  # per fake: balls containing it
    real_in_fake_ball = np.zeros(real.shape[0], dtype=bool)
    real_ball_hit = np.zeros(real.shape[0], dtype=bool)
    step = _block_rows(fake.shape[0])
    for start in range(0, real.shape[0], step):
        stop = start + step
        d = cdist(real[start:stop], fake)
        inside = d < real_radii[start:stop, None]
        fakes_in_real_balls += inside.sum(axis=0)
        real_ball_hit[start:stop] = d.min(axis=1) < real_radii[start:stop]
        real_in_fake_ball[start:stop] = (d < fake_radii[None, :]).any(axis=1)
    return {
        "precision": float((fakes_in_real_balls > 0).mean()),
        "recall": float(real_in_fake_ball.mean()),
        "density": float(fakes_in_real_balls.mean() / nearest_k),
        "coverage": float(real_ball_hit.mean()),
    }


# --------------------------------------------------------------------------------------------
# Sample-size honesty


def frechet_distance_of_features(real_features, generated_features) -> float:
    """FID (Inception features) or FD-DINOv2 (DINOv2 features) straight from two feature sets,
    the form :func:`bootstrap_interval` resamples.

    With fewer images than dimensions (a few hundred photos against Inception's 2,048) the
    covariances have rank below d, and the trace term comes from the images instead of two
    d x d eigendecompositions: with S1 = A A^T and S2 = B B^T (A = centred features^T /
    sqrt(n - 1)), the non-zero eigenvalues of S1 S2 are those of (A^T B)(A^T B)^T, so
    tr((S1 S2)^{1/2}) is the sum of A^T B's singular values, an n1 x n2 matrix. The same number
    as :func:`fashion_sd.evaluation.fid.frechet_distance` (tested), 10-50x faster there, which
    makes a bootstrap of FID affordable on a CPU."""
    real, generated = _feature_pair(real_features, generated_features)
    if min(len(real), len(generated)) >= real.shape[1]:
        return frechet_distance(*feature_stats(real), *feature_stats(generated))
    a = (real - real.mean(axis=0)) / np.sqrt(len(real) - 1)
    b = (generated - generated.mean(axis=0)) / np.sqrt(len(generated) - 1)
    diff = real.mean(axis=0) - generated.mean(axis=0)
    nuclear = float(np.linalg.svd(a @ b.T, compute_uv=False).sum())
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * nuclear)


@dataclass(frozen=True)
class BootstrapInterval:
    """A metric on the full sets and its bootstrap spread.

    ``low``/``high``: percentile interval at ``level``; ``std``: standard deviation of the
    replicates (ddof 1), the metric's standard error; ``mean``: the replicates' mean, which
    sits above ``estimate`` for FID and CMMD (see :func:`bootstrap_interval`).
    """

    estimate: float
    low: float
    high: float
    std: float
    mean: float
    n_boot: int
    level: float


def bootstrap_interval(metric: Metric, real_features, generated_features, n_boot: int = 100,
                       seed: int = 0, level: float = 0.95) -> BootstrapInterval:
    """How much ``metric(real, generated)`` moves when other images had been drawn.

    Each of ``n_boot`` replicates resamples the real rows and the generated rows with
    replacement (``numpy.random.default_rng(seed)``, real then generated, replicate by
    replicate) and recomputes the metric; the interval is the replicates' percentiles. Two
    checkpoints whose intervals overlap are not shown to differ.

    Resamples repeat images. That is the standard bootstrap, and it shifts FID and CMMD
    upwards: a resample has ~63% distinct rows, which narrows FID's covariances, and its
    duplicates act as extra i = j terms in CMMD, about doubling the estimator's bias. Where the
    sets differ clearly, the spread (~1/sqrt(n)) outgrows the shift (~1/n); for CMMD near 0
    (two samples of one distribution) the shift dominates at any size and the interval lies
    wholly above the estimate (1,000 x 768 Gaussians: estimate 0.021, interval 0.037-0.043).
    So read the width and ``std``, not whether the interval holds the estimate.

    Cost: ``n_boot + 1`` metric calls. One FID at 2,048 images x 2,048-d (two covariances,
    two 2,048 x 2,048 eigendecompositions) took 11 s on this project's busy 2-core machine, so
    the default 100 resamples take ~20 minutes there: pass n_boot 20-50 for FID. CMMD on 1,000
    x 768 takes ~0.1 s a call (11 s for 100 resamples); FD-DINOv2 (1,024-d) several times less than FID.
    """
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2 for a spread, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    real, generated = _feature_pair(real_features, generated_features)
    estimate = float(metric(real, generated))
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        ir = rng.integers(0, real.shape[0], real.shape[0])
        ig = rng.integers(0, generated.shape[0], generated.shape[0])
        values[b] = metric(real[ir], generated[ig])
    if not np.isfinite(values).all():
        raise ValueError(f"the metric returned NaN or inf on {int((~np.isfinite(values)).sum())} "
                         f"of {n_boot} resamples; it cannot be bootstrapped on these sets")
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return BootstrapInterval(estimate=estimate, low=float(low), high=float(high),
                             std=float(values.std(ddof=1)), mean=float(values.mean()),
                             n_boot=n_boot, level=level)


_PRDC_NAMES = ("prdc", "precision", "recall", "density", "coverage")
METRIC_NAMES = ("fid", "fd_dinov2", "kid", "cmmd", *_PRDC_NAMES)


def reliability_note(metric: str, n_real: int, n_generated: int,
                     nearest_k: int = PRDC_NEAREST_K) -> str | None:
    """The caveat a table prints beside ``metric`` scored on these image counts, or None.

    - fid, fd_dinov2: below :data:`~fashion_sd.evaluation.fid.FID_MIN_IMAGES` a set, as
      ``fid.warn_if_biased`` says (DINOv2 ViT-L/14 features are 1,024-d, but the Fréchet
      distance is biased upwards at any finite size, so both keep the project's one floor).
    - kid: never; it is unbiased at any size.
    - cmmd: when the worst-case bias of the biased estimator (:func:`cmmd_bias_bound`) exceeds
      :data:`CMMD_BIAS_TOLERANCE`, i.e. below about 400 images a set.
    - prdc and its parts: at most ``nearest_k`` images (it cannot be computed), or fewer than
      :data:`PRDC_REFERENCE_IMAGES` (comparable only at equal set sizes).
    """
    name = metric.lower()
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRIC_NAMES)}")
    if min(n_real, n_generated) < 1:
        raise ValueError(f"image counts must be positive, got {n_real} real and "
                         f"{n_generated} generated")
    sizes = f"{n_real} real and {n_generated} generated images"
    if name in ("fid", "fd_dinov2"):
        if min(n_real, n_generated) >= FID_MIN_IMAGES:
            return None
        return (f"biased upwards from {sizes} (needs {FID_MIN_IMAGES} each to compare with "
                f"published values); compares only runs scored on the same numbers of images")
    if name == "kid":
        return None
    if name == "cmmd":
        bound = cmmd_bias_bound(n_real, n_generated)
        if bound <= CMMD_BIAS_TOLERANCE:
            return None
        return (f"from {sizes} the estimator's upward bias can reach {bound:.2f}; differences "
                f"below that compare only runs scored on the same numbers of images")
    if min(n_real, n_generated) <= nearest_k:
        return f"not computable from {sizes}: k = {nearest_k} needs at least {nearest_k + 1} each"
    if min(n_real, n_generated) < PRDC_REFERENCE_IMAGES:
        return (f"k-NN radii from {sizes} are wider than at the {PRDC_REFERENCE_IMAGES} each of "
                f"the reference setting; compares only runs scored on the same numbers of images")
    return None
