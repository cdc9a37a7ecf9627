"""Where the loss looks: a mask per training photo, 1 on the garment and 0 on the background, at
the latent grid, for ``train.mask_background_weight`` (:func:`fashion_sd.sd.diffusion.epsilon_loss`).

The catalogue's photos are a garment on a plain white or grey background, so most of every
latent the loss averages over is background the model learns nothing useful from. Each photo's
mask comes from, in this order:

1. ``file``: the captions' ``mask`` column, a mask image per row (white: the garment), as kohya
   takes them;
2. ``alpha``: the photo's own alpha channel;
3. ``auto``: the photo's plain background, found as the garment metrics find it
   (:mod:`fashion_sd.evaluation.garment`: the border's median colour, Delta E above 12 is
   foreground), holes filled and grown by a latent cell's width so the garment's edge keeps its
   weight;
4. ``none``: a photo with no plain background (a model in a street) or nothing standing out gets
   no mask: weight 1 everywhere, and it is counted.

Masks are made once, beside the VAE cache, for each image and its mirror image (a flipped step
reads the flipped mask), at the latent grid by area averaging (``F.interpolate(mode="area")``, as
kohya resizes its masks to the latents).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy import ndimage

from fashion_sd.evaluation import garment
from fashion_sd.images import load_image, load_mask

MASK_VERSION = 1  # part of the cache key: a change in how masks are made rebuilds them
SOURCES = ("file", "alpha", "auto", "none")
LATENT_FACTOR = 8  # the VAE's downsampling


def garment_mask(image: np.ndarray) -> np.ndarray | None:
    """The garment on a plain background: bool HW, or None when the border is no plain
    background or nothing stands out from it (what :func:`garment.analyse` abstains on)."""
    lab = garment.srgb_to_lab(np.asarray(image)[..., :3])
    if garment.plain_border_share(lab) < garment.PLAIN_BORDER:
        return None
    foreground = np.linalg.norm(lab - garment.background_lab(lab), axis=-1) > garment.EDGE_THRESHOLD
    if foreground.mean() < garment.MIN_FOREGROUND:
        return None
    # A white shirt's folds match the white background: fill what the outline encloses, and grow
    # by one latent cell so the edge cells, half garment, count as garment.
    filled = ndimage.binary_fill_holes(foreground)
    return ndimage.binary_dilation(filled, iterations=LATENT_FACTOR // 2)


def to_latent_grid(mask: np.ndarray, factor: int = LATENT_FACTOR) -> np.ndarray:
    """Each latent cell's share of garment: the mean over its ``factor`` x ``factor`` pixels."""
    h, w = mask.shape
    cells = np.asarray(mask, np.float32).reshape(h // factor, factor, w // factor, factor)
    return cells.mean(axis=(1, 3))


def photo_mask(path: str, resolution, mask_path: str | None = None) -> tuple[np.ndarray, str]:
    """(the photo's mask at pixel resolution, float32 HW, and its source: :data:`SOURCES`)."""
    if mask_path:
        return load_mask(mask_path, resolution), "file"
    alpha = load_mask(path, resolution, alpha=True)
    if alpha is not None:
        return alpha, "alpha"
    image = load_image(path, resolution)  # decoded once, whichever way the mask is made
    found = garment_mask(image)
    if found is None:
        return np.ones(image.shape[:2], np.float32), "none"
    return found.astype(np.float32), "auto"


def latent_masks(paths: list[str], resolution, mask_paths=None) -> tuple[np.ndarray, Counter]:
    """(n, 2, h/8, w/8) float32 masks of each photo and its mirror image, and how many came
    from each source."""
    mask_paths = mask_paths if mask_paths is not None else [None] * len(paths)
    out, sources = [], Counter()
    for path, mask_path in zip(paths, mask_paths):
        mask, source = photo_mask(path, resolution, mask_path)
        sources[source] += 1
        grid = to_latent_grid(mask)
        out.append(np.stack([grid, grid[:, ::-1]]))
    return np.stack(out) if out else np.zeros((0, 2, 0, 0), np.float32), sources


def describe(masks: np.ndarray, rows=None) -> dict:
    """What a run's masks hold, for run.json and the log: of ``rows`` (the train split; all by
    default), photos masked (some weight below 1), unmasked (weight 1 everywhere), and the
    garment's mean share of the frame where masked (None when none is)."""
    rows_all = np.arange(len(masks)) if rows is None else np.asarray(rows)
    n, masked, share = len(rows_all), 0, 0.0
    for start in range(0, n, 4096):  # a memory-mapped cache, a chunk of rows at a time
        rows = rows_all[start: start + 4096]
        flat = np.asarray(masks[rows, np.zeros_like(rows)], np.float32).reshape(len(rows), -1)
        some = flat.min(axis=1) < 1
        masked += int(some.sum())
        share += float(flat[some].mean(axis=1).sum())
    return {"photos": int(n), "masked": masked, "unmasked": int(n - masked),
            "garment_share": round(share / masked, 4) if masked else None}
