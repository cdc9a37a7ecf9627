"""FID speed at Inception's 2048 dimensions against pytorch-fid, and feature-extraction speed.

    python benchmarks/fid.py [--images 3000] [--batch 32] [--batches 3]

Times our ``frechet_distance`` and pytorch-fid's ``calculate_frechet_distance`` (read from its
source by tests/reference_fid.py; ``make test`` installs it) on the same statistics of
``--images`` non-negative random 2048-d features per side, then the untrained Inception's
throughput on 256x256 uint8 images (its speed is the trained networks' speed: same graph).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._machine import describe  # noqa: E402
from fashion_sd.evaluation.fid import feature_stats, frechet_distance  # noqa: E402
from tests.reference_fid import reference_frechet_distance  # noqa: E402


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=3000, help="feature rows per side")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=3, help="timed batches after one warm-up")
    args = ap.parse_args()
    print(f"machine: {describe()}")

    d = 2048
    rng = np.random.default_rng(0)
    # pool_3 features are averages of ReLUs: non-negative, correlated
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    a = np.abs(rng.standard_normal((args.images, d)) @ mix)
    b = np.abs(rng.standard_normal((args.images, d)) @ mix + 0.05)
    (m1, s1), (m2, s2) = feature_stats(a), feature_stats(b)
    ours, t_ours = timed(frechet_distance, m1, s1, m2, s2)
    ref, t_ref = timed(reference_frechet_distance, m1, s1, m2, s2)
    print(f"FID at d={d} from {args.images} images per side: ours {t_ours:.2f} s, "
          f"pytorch-fid {t_ref:.2f} s, ratio {t_ref / t_ours:.1f}x faster; "
          f"values {ours:.6f} vs {ref:.6f}, relative difference {abs(ours - ref) / abs(ref):.1e}")

    from fashion_sd.evaluation.inception import untrained_extractor

    extractor, t_build = timed(untrained_extractor)
    images = rng.integers(0, 256, (args.batch, 256, 256, 3), dtype=np.uint8)
    extractor(images[:2])  # warm-up: first-call set-up is not throughput
    t0 = time.perf_counter()
    for _ in range(args.batches):
        extractor(images, batch_size=args.batch)
    dt = time.perf_counter() - t0
    n = args.batches * args.batch
    print(f"Inception features (untrained, built in {t_build:.1f} s): {n} images of 256x256 in "
          f"batches of {args.batch}: {n / dt:.1f} images/s")


if __name__ == "__main__":
    main()
