"""Image metrics: FID and KID on Inception features; prompt adherence (CLIP) and garment judgements.

``fid``, ``adherence`` and ``garment`` hold the numerics (numpy/scipy only); ``inception`` and
``clip`` the networks (TensorFlow); ``judge`` puts the per-image judgements together. The extractor names are loaded on first use, so importing the numerics from here
does not import TensorFlow.
"""

from fashion_sd.metrics.fid import (
    FID_MIN_IMAGES,
    SmallSampleWarning,
    cached_stats,
    feature_stats,
    frechet_distance,
    kid,
    kid_subset_size,
    mmd2_unbiased,
    polynomial_kernel,
    stats_key,
    warn_if_biased,
)

_INCEPTION = ("FeatureExtractor", "InceptionUnavailable", "PREPROCESSING", "TFHUB_HANDLE",
              "load_extractor", "load_real_image", "preprocess", "real_image_features",
              "untrained_extractor")

__all__ = ["FID_MIN_IMAGES", "SmallSampleWarning", "cached_stats", "feature_stats",
           "frechet_distance", "kid", "kid_subset_size", "mmd2_unbiased", "polynomial_kernel", "stats_key",
           "warn_if_biased", *_INCEPTION]


def __getattr__(name: str):
    if name in _INCEPTION:
        from fashion_sd.metrics import inception

        return getattr(inception, name)
    raise AttributeError(f"module 'fashion_sd.metrics' has no attribute {name!r}")
