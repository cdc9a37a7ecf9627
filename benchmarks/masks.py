"""Loss masks on real catalogue photos (train.mask_background_weight): the share of photos masked
(a plain background found), the garment's share of the frame, the time to make them and what
they add to the cache beside the VAE moments, measured in one run on this machine; with
``--picture`` a sheet of photos with their masks over them (docs/masks.png).

    python benchmarks/masks.py [--images data/demo/images] [--resolution 256] [--picture docs/masks.png]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bad_flags import machine  # noqa: E402

from fashion_sd.images import EXTENSIONS, image_size, load_image  # noqa: E402
from fashion_sd.training import masks  # noqa: E402


def picture(paths, made, resolution, out: Path, n: int = 12) -> Path:
    """Photos in a row each, the masked-out background dimmed and tinted: what the loss sees."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, len(paths))
    fig, axes = plt.subplots(1, cols, figsize=(1.6 * cols, 2.2), squeeze=False)
    for ax, path, grid in zip(axes[0], paths, made):
        image = load_image(path, resolution).astype(np.float32) / 255
        weight = np.kron(grid[0], np.ones((masks.LATENT_FACTOR, masks.LATENT_FACTOR)))[..., None]
        tint = np.array([0.85, 0.25, 0.25])
        ax.imshow(image * (0.35 + 0.65 * weight) + (1 - weight) * 0.3 * tint)
        ax.set_title(f"{grid[0].mean():.0%}", fontsize=8)
        ax.axis("off")
    fig.suptitle("Loss masks (red: background, weight train.mask_background_weight; "
                 "title: the garment's share of the latent grid)", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(ROOT / "data/demo/images"))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--limit", type=int, default=0, help="at most this many photos (0: all)")
    parser.add_argument("--picture", help="write a sheet of photos with their masks here")
    args = parser.parse_args()
    paths = sorted(str(p) for p in Path(args.images).iterdir() if p.suffix in EXTENSIONS)
    paths = paths[: args.limit] if args.limit else paths
    start = time.perf_counter()
    made, sources = masks.latent_masks(paths, args.resolution)
    seconds = time.perf_counter() - start
    summary = masks.describe(made)
    w, h = image_size(args.resolution)
    mask_bytes = 2 * (h // 8) * (w // 8) * 2  # two orientations, float16
    moment_bytes = 2 * (h // 8) * (w // 8) * 8 * 2  # the VAE cache's row, float16 storage
    print(f"machine: {machine()}\n{len(paths)} photos from {args.images} at {args.resolution} px")
    print(f"sources: {dict(sources)}")
    print(f"masked: {summary['masked']} of {summary['photos']} "
          f"({summary['masked'] / max(1, summary['photos']):.0%}); the garment's share of the "
          f"frame where masked: {summary['garment_share']:.0%}")
    print(f"time: {seconds:.2f} s, {1e3 * seconds / max(1, len(paths)):.1f} ms a photo "
          "(decoded once more than the VAE cache decodes it)")
    print(f"cache: {mask_bytes} bytes a photo beside {moment_bytes} of VAE moments "
          f"(+{mask_bytes / moment_bytes:.1%}); {mask_bytes * len(paths) / 2**20:.2f} MiB here")
    if args.picture:
        print(f"picture: {picture(paths, made, args.resolution, Path(args.picture))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
