"""Catalogue images with Pillow (no TensorFlow): finding and checking the files before any training
sees them, and decoding one the way training, generation and FID all see it (:func:`load_image`)."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fashion_sd import remote

# Formats the training pipeline decodes; any mode (L, RGBA, CMYK, P, ...) is converted there.
ACCEPTED_FORMATS = ("JPEG", "PNG")
# Preferred first: the catalogue names every image {id}.jpg.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


def index_folder(folder: str | Path) -> dict[str, Path]:
    """Map each file stem in ``folder`` to its path, preferring ``.jpg`` when a stem repeats.

    One directory listing instead of a ``stat`` per id: 44k lookups stay instant on slow disks.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found")
    rank = {ext: i for i, ext in enumerate(EXTENSIONS)}
    best: dict[str, tuple[int, str]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, ext = os.path.splitext(entry.name)
            if ext in rank and (stem not in best or rank[ext] < best[stem][0]):
                best[stem] = (rank[ext], entry.name)
    return {stem: folder / name for stem, (_, name) in best.items()}


# The most pixels an image may have. The catalogue's photos are 1800x2400 (4.3 MP) and a 24 MP
# camera's 6000x4000; 64 MP is far above both, and below Pillow's own decompression-bomb warning
# (89 MP; an error from 179 MP): a small PNG or JPEG that claims more is refused from its header,
# before it is decoded (64 MP of RGB is 192 MB, times captions.image_workers threads).
MAX_PIXELS = 64_000_000


# The most one side may exceed the other. Padded to the training size (64 px or more), a
# shorter side of 1/20 of the longer keeps 3 pixels or more; a 1x2000 strip kept none, and the
# resize failed inside training with no file named. The catalogue's photos are 3:4.
MAX_ASPECT = 20


def too_large(width: int, height: int) -> str | None:
    """Why an image of this size is refused, or None."""
    if width * height > MAX_PIXELS:
        return (f"too large: {width}x{height} is {width * height / 1e6:.0f} megapixels, above the "
                f"{MAX_PIXELS // 1_000_000} MP limit (a decompression bomb, or a photo to "
                "downscale first)")
    if max(width, height) > MAX_ASPECT * min(width, height):
        return (f"too narrow: {width}x{height} is more than {MAX_ASPECT} times longer than it is "
                "wide, so its shorter side all but vanishes at the training size; crop it")
    return None


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "unreadable: a symbolic-link loop (the link leads back to itself); replace it " \
               "with the image file"
    return f"unreadable: {exc.strerror or exc}"


def header_problem(path: str | Path) -> str | None:
    """Why the image at ``path`` cannot be used, from its header alone (no pixel decoded): not
    there, a symbolic-link loop, empty, not JPEG or PNG, too large. None when the header is
    fine; :func:`check_image` decodes it too."""
    try:
        if os.stat(path).st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            if im.format not in ACCEPTED_FORMATS:
                return f"unsupported format {im.format} (JPEG or PNG expected)"
            return too_large(*im.size)
    except FileNotFoundError:
        return "missing file"
    except Image.DecompressionBombError as exc:
        return f"too large: {exc}"
    except UnidentifiedImageError:
        return "unreadable: not an image Pillow recognises"
    except OSError as exc:
        return _os_reason(exc)
    except (SyntaxError, ValueError) as exc:
        return f"unreadable: {exc}"


def check_image(path: Path | None) -> str | None:
    """Why the image at ``path`` cannot be used, or None when it decodes completely."""
    if path is None:
        return "missing file"
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            if im.format not in ACCEPTED_FORMATS:
                return f"unsupported format {im.format} (JPEG or PNG expected)"
            if reason := too_large(*im.size):
                return reason
            # Decode at 1/8 scale where JPEG allows it: every byte is still read, so truncation
            # shows, but a 1800x2400 catalogue photo costs a fraction of a full decode.
            im.draft(None, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except FileNotFoundError:
        return "missing file"
    except Image.DecompressionBombError as exc:
        return f"too large: {exc}"
    except UnidentifiedImageError:
        return "unreadable: not an image Pillow recognises"
    except OSError as exc:
        if exc.errno is not None:  # the file system's, not the decoder's
            return _os_reason(exc)
        text = str(exc)
        if "truncated" in text or "broken data stream" in text:
            return f"truncated: {text}"
        return f"unreadable: {text}"
    except (SyntaxError, ValueError) as exc:
        text = str(exc)
        if "truncated" in text or "broken data stream" in text:
            return f"truncated: {text}"
        return f"unreadable: {text}"
    return None


def inspect_image(path: Path | None) -> tuple[str | None, str | None]:
    """(why the image at ``path`` cannot be used or None, a digest of its bytes or None): the
    digest finds the same photo under two ids, which a split would otherwise put in train and
    test alike."""
    reason = check_image(path)
    if reason is not None:
        return reason, None
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as fh:  # just decoded: read again from the page cache
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        return _os_reason(exc), None
    return None, digest.hexdigest()


def resolved(path: Path) -> Path:
    """``path.resolve()``, or ``path`` itself when it cannot be resolved (a symbolic-link loop,
    which :func:`check_image` then names)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # Python < 3.13 raises RuntimeError for a loop
        return path


def check_images(
    paths: Iterable[Path | None],
    workers: int = 8,
    progress: Callable[[Iterator], Iterator] | None = None,
    check: Callable = check_image,
) -> list:
    """``check`` (:func:`check_image`, or :func:`inspect_image`) for each path, in order, on
    ``workers`` threads (Pillow and hashlib free the GIL)."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(check, paths)
        if progress is not None:
            results = progress(results)
        return list(results)


def background_colour(img: Image.Image) -> tuple[int, ...]:
    """The median colour of the image's one-pixel border: the studio backdrop in the catalogue."""
    a = np.asarray(img)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


def image_size(resolution: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a resolution setting: one number is a square, ``[w, h]`` a rectangle
    (``[384, 512]`` is the catalogue's 3:4 portrait)."""
    if isinstance(resolution, (list, tuple)):
        w, h = resolution
        return int(w), int(h)
    return int(resolution), int(resolution)


def valid_size(resolution) -> bool:
    """A resolution the VAE (/8) and the U-Net (/8 more) take: one positive multiple of 64, or
    ``[width, height]`` of two; the one rule config, the builders and generate.py apply."""
    sides = list(resolution) if isinstance(resolution, (list, tuple)) else [resolution]
    # a list is [width, height]: one side alone is written as a number
    return len(sides) == (2 if isinstance(resolution, (list, tuple)) else 1) and all(
        isinstance(x, int) and not isinstance(x, bool) and x > 0 and x % 64 == 0 for x in sides)


def size_label(resolution) -> str:
    """``256`` for a square, ``384x512`` for a rectangle: for file names, logs and plots."""
    w, h = image_size(resolution)
    return str(w) if w == h else f"{w}x{h}"


def load_image(path: str | Path, resolution: int | list[int] | None) -> np.ndarray:
    """Decode any JPEG/PNG mode to RGB, pad to the training aspect on its own background, resize:
    uint8 HWC of ``image_size(resolution)``.

    Padding instead of the paper's centre crop keeps portrait garments whole (the paper reports
    generated garments cut off at the frame). JPEGs are decoded at a reduced scale when they are
    much larger than needed (the full catalogue's 1800x2400 photos). ``resolution=None`` pads to
    a square at the image's own size (its longer side) and does not resample.
    """
    with remote.open_file(path) as fh, Image.open(fh) as im:
        if reason := too_large(*im.size):
            raise ValueError(f"{path}: {reason}")
        # A phone photo stored sideways with an EXIF orientation is shown upright by every
        # viewer and by torchvision's and diffusers' loaders (exif_transpose): train on it so.
        turned = im.getexif().get(ORIENTATION) in (5, 6, 7, 8)
        if resolution is None:
            resolution = max(im.size)
        elif im.format == "JPEG":
            w, h = image_size(resolution)
            im.draft("RGB", (h, w) if turned else (w, h))
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        elif im.mode.startswith("I"):
            rgb = _sixteen_bit_grey(im)
        else:
            rgb = im.convert("RGB")  # L, CMYK, P ... all become RGB
    padded = ImageOps.pad(rgb, image_size(resolution), method=Image.Resampling.BICUBIC,
                          color=background_colour(rgb))
    return np.asarray(padded, dtype=np.uint8)


ORIENTATION = 0x0112  # the EXIF tag


def load_mask(path: str | Path, resolution, alpha: bool = False) -> np.ndarray | None:
    """A mask laid out as :func:`load_image` lays out its image: float32 HW in [0, 1] of
    ``image_size(resolution)``, EXIF-turned, padded with 0 (background) where the image is
    padded. ``path`` is a mask image (its luminance: white is the garment, as kohya reads
    masks), or with ``alpha`` an image whose alpha channel is the mask (None when it has none)."""
    with remote.open_file(path) as fh, Image.open(fh) as im:
        if reason := too_large(*im.size):
            raise ValueError(f"{path}: {reason}")
        im = ImageOps.exif_transpose(im)
        if alpha:
            if im.mode not in ("RGBA", "LA") and not (im.mode == "P" and "transparency" in im.info):
                return None
            grey = im.convert("RGBA").getchannel("A")
            if grey.getextrema()[0] == 255:  # opaque everywhere: an export tool's, not a mask
                return None
        else:
            grey = im.convert("L")
    padded = ImageOps.pad(grey, image_size(resolution), method=Image.Resampling.BILINEAR, color=0)
    return np.asarray(padded, dtype=np.float32) / np.float32(255)


def _sixteen_bit_grey(im: Image.Image) -> Image.Image:
    """A 16-bit greyscale PNG (Pillow's modes I;16 and I) as 8-bit RGB, 0-65535 scaled to
    0-255 and rounded. Pillow's own convert clips it instead, which made every such photo white."""
    grey = np.asarray(im, dtype=np.float64) * (255 / 65535)
    return Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8), "L").convert("RGB")


# --------------------------------------------------------------------------------------------
# Source resolution against the training size

FULL_RESOLUTION_DATASET = "paramaggarwal/fashion-product-images-dataset"


def upscale_factors(paths, resolution, limit: int = 200) -> np.ndarray:
    """How much each image is enlarged to fit ``resolution`` (after padding to its aspect):
    ``min(W / w, H / h)``; read from the file headers of at most ``limit`` evenly spaced paths."""
    paths = [p for p in paths if p]
    if not paths:
        return np.zeros(0)
    pick = np.unique(np.linspace(0, len(paths) - 1, min(limit, len(paths))).astype(int))
    width, height = image_size(resolution)
    out = []
    for i in pick:
        try:
            with remote.open_file(paths[i]) as fh, Image.open(fh) as im:
                w, h = im.size
        except (OSError, Image.DecompressionBombError):
            continue  # reported by the image checks, not here
        out.append(min(width / w, height / h))
    return np.asarray(out, float)


def upscale_warning(factors: np.ndarray, resolution) -> str | None:
    """One line when most images would be enlarged more than 2x (the 60x80 "small" set at 512 px
    is 6.4x): such training learns the blur of the enlargement."""
    if len(factors) == 0 or np.mean(factors > 2.0) <= 0.5:
        return None
    return (f"{np.mean(factors > 2.0):.0%} of the source images are enlarged more than 2x to "
            f"{size_label(resolution)} px (median {np.median(factors):.1f}x): the model learns "
            f"upscaling blur. Use the full-resolution Kaggle dataset ({FULL_RESOLUTION_DATASET}, "
            "1800x2400 photos) or a smaller data.resolution")
