"""What each distance beside FID adds per checkpoint at N images a set (default 1,000): the
numerics on features of the real sizes (CLIP ViT-L/14: 768, DINOv2 ViT-L/14: 1,024, Inception:
2,048), with eval.bootstrap's resamples, and with ``--networks`` the forward passes that make
the features (random-init ViT-L/14s at their real size, timed on a few images and scaled to N:
said so in the output). Wall time and peak traced memory (tracemalloc: numpy's buffers) of
each numeric step, and for the networks the process's peak RSS, measured in one run on this
machine.

    python benchmarks/distances.py [--images 1000] [--bootstrap 20] [--networks]
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bad_flags import machine  # noqa: E402 - the same machine line as the other benchmarks

from fashion_sd.evaluation import distances as d  # noqa: E402


def measure(fn) -> tuple[float, float]:
    """(seconds, peak MB traced) of one call."""
    tracemalloc.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak


def rss_mb() -> float:
    """The process's peak resident memory so far (TensorFlow's and JAX's buffers are not
    traced): for the networks, each row includes the ones before it."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def numerics(n: int, n_boot: int, rng) -> list[tuple[str, float, float]]:
    clip = [rng.standard_normal((n, 768)) for _ in range(2)]
    dino = [rng.standard_normal((n, 1024)) + s for s in (0.0, 0.1)]
    inception = [np.abs(rng.standard_normal((n, 2048))) + s for s in (0.0, 0.1)]
    cases = [
        ("CMMD (768-d)", lambda: d.cmmd(*clip)),
        (f"CMMD bootstrap x{n_boot}", lambda: d.bootstrap_interval(d.cmmd, *clip, n_boot)),
        ("FD-DINOv2 (1,024-d)", lambda: d.frechet_distance_of_features(*dino)),
        (f"FD-DINOv2 bootstrap x{n_boot}",
         lambda: d.bootstrap_interval(d.frechet_distance_of_features, *dino, n_boot)),
        (f"FID bootstrap x{n_boot} (2,048-d)",
         lambda: d.bootstrap_interval(d.frechet_distance_of_features, *inception, n_boot)),
        ("PRDC on DINOv2 (k=5)", lambda: d.prdc(*dino)),
        ("PRDC on Inception (k=5)", lambda: d.prdc(*inception)),
    ]
    return [(name, *measure(fn)) for name, fn in cases]


def networks(n: int, sample: int = 8) -> list[tuple[str, float, float]]:
    """Forward passes of random ViT-L/14s at their real size on ``sample`` images, scaled to n."""
    import keras

    from fashion_sd.evaluation import clip, dinov2

    images = [np.random.default_rng(i).integers(0, 255, (256, 256, 3), np.uint8)
              for i in range(sample)]
    rows = []
    keras.utils.set_random_seed(0)
    judge = clip.ClipModel("random", clip.random_clip("clip-vit-large-patch14"), True)
    judge.embed_images(images[:2])  # traced once, as a scoring does before its first model
    seconds, _ = measure(lambda: judge.embed_images(images))
    rows.append((f"CLIP ViT-L/14 image embeddings (x{n / sample:g} of {sample})",
                 seconds * n / sample, rss_mb()))
    backbone = dinov2._keras_hub().models.DINOV2Backbone(
        patch_size=14, num_layers=24, hidden_dim=1024, num_heads=16, intermediate_dim=4096,
        image_shape=(224, 224, 3), position_embedding_shape=(518, 518, 3))
    model = dinov2.DinoV2("random", backbone, dinov2.class_token_model(backbone), 224,
                          "dgm-eval", "dinov2")
    dinov2.features(images[:2], model)
    seconds, _ = measure(lambda: dinov2.features(images, model))
    rows.append((f"DINOv2 ViT-L/14 features (x{n / sample:g} of {sample})",
                 seconds * n / sample, rss_mb()))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images a set")
    parser.add_argument("--bootstrap", type=int, default=20, help="resamples (eval.bootstrap)")
    parser.add_argument("--networks", action="store_true",
                        help="also the CLIP and DINOv2 forward passes (minutes on a CPU)")
    args = parser.parse_args()
    print(f"machine: {machine()}\n{args.images} real and {args.images} generated images a set\n")
    rows = numerics(args.images, args.bootstrap, np.random.default_rng(0))
    if args.networks:
        rows += networks(args.images)
    print(f"{'what':48s} {'seconds':>9s} {'peak MB':>9s}  (networks: process peak RSS)")
    for name, seconds, peak in rows:
        print(f"{name:48s} {seconds:9.2f} {peak:9.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
