"""Weight-free garment metrics: the garment's colour against the catalogue's colour names, and
whether the garment is cut off by the frame. numpy and scipy.ndimage only, so they run on any
folder of images.

Both start from one analysis of the photo (:func:`analyse`): the background is the median colour
of the photo's own border, as catalogue photos are shot on plain backgrounds, and the foreground
is what stands far (in CIELAB) from it. Both *abstain* (None: undetermined, not wrong) when that
analysis finds no garment: when the border is no plain background (a garment filling the frame,
whose "background" would be the garment itself) or when almost nothing stands out from it (a
white shirt on the catalogue's white background).

Calibration on real catalogue photos: docs/evaluation.md, ``benchmarks/garment_calibration.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

# The catalogue's colour names (docs/dataset.md: 46 values) as sRGB; "Multi" has no single
# colour and is never predicted or scored.
PALETTE = {
    "Black": (20, 20, 20), "White": (250, 250, 250), "Off White": (240, 235, 220),
    "Cream": (245, 235, 200), "Grey": (128, 128, 128), "Grey Melange": (160, 160, 165),
    "Charcoal": (60, 62, 66), "Silver": (192, 192, 192), "Steel": (113, 121, 126),
    "Metallic": (170, 169, 173), "Navy Blue": (25, 35, 90), "Blue": (40, 90, 200),
    "Turquoise Blue": (64, 200, 210), "Teal": (0, 128, 128), "Sea Green": (46, 139, 87),
    "Green": (40, 140, 60), "Olive": (110, 110, 40), "Lime Green": (140, 210, 60),
    "Fluorescent Green": (90, 255, 60), "Khaki": (190, 175, 120), "Beige": (225, 205, 170),
    "Tan": (205, 165, 115), "Skin": (235, 190, 160), "Nude": (225, 180, 150),
    "Peach": (250, 190, 150), "Brown": (120, 70, 35), "Coffee Brown": (90, 60, 40),
    "Mushroom Brown": (155, 130, 110), "Taupe": (135, 120, 105), "Bronze": (165, 110, 50),
    "Copper": (185, 100, 50), "Rust": (170, 70, 30), "Gold": (212, 175, 55),
    "Mustard": (215, 170, 40), "Yellow": (245, 215, 40), "Orange": (245, 130, 30),
    "Red": (200, 30, 40), "Maroon": (110, 20, 35), "Burgundy": (125, 25, 50),
    "Rose": (220, 110, 130), "Pink": (240, 150, 180), "Magenta": (200, 40, 140),
    "Mauve": (180, 130, 160), "Lavender": (190, 170, 220), "Purple": (110, 50, 140),
}
NEIGHBOURS = 2  # a prediction also counts when it is one of the label's 2 nearest palette colours

COLOUR_THRESHOLD = 8.0    # Delta E from the background above which a pixel votes for a colour
EDGE_THRESHOLD = 12.0     # ... above which a pixel counts as foreground for cut-off (less noise)
PLAIN_BORDER = 0.5        # a majority of the border must match its median for it to be a background
MIN_FOREGROUND = 0.02     # below this share of the image, no garment was found
GARMENT_DELTA_E = 20.0    # pixels this close to the garment's colour belong to the garment's region
SIDE_FRACTION = 0.3       # a cut: foreground along this much of the left or right edge ...
END_FRACTION = 0.4        # ... or the garment's own region along this much of the top or bottom
CENTRE_SIGMA = 0.25       # colour votes weigh by a Gaussian of this width (share of the side)


def srgb_to_lab(rgb) -> np.ndarray:
    """sRGB (0-255, ..., 3) -> CIELAB (D65), the CIE formulas. Written out (20 lines) rather than
    adding scikit-image for one conversion; checked against published values in the tests."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], axis=-1)


_NAMES = list(PALETTE)
_PALETTE_LAB = srgb_to_lab(np.array([PALETTE[n] for n in _NAMES]))


def _border(lab: np.ndarray) -> np.ndarray:
    return np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])


def background_lab(lab: np.ndarray) -> np.ndarray:
    """The photo's background: the median colour of its one-pixel border."""
    return np.median(_border(lab), axis=0)


def plain_border_share(lab: np.ndarray, threshold: float = EDGE_THRESHOLD) -> float:
    """Share of the border within ``threshold`` of its median colour. A catalogue photo's border
    is background nearly all round (over 0.7 in 99% of the calibration photos, 0.54 at least in
    the bundled 48, where models run off two edges); when a garment fills the frame no colour
    holds a majority of the border, and its median is no background."""
    border = _border(lab)
    return float((np.linalg.norm(border - np.median(border, axis=0), axis=1) <= threshold).mean())


def foreground_mask(image, threshold: float = EDGE_THRESHOLD) -> np.ndarray:
    """Pixels whose CIELAB distance (Delta E 1976) from the background exceeds ``threshold``."""
    lab = srgb_to_lab(np.asarray(image)[..., :3])
    return np.linalg.norm(lab - background_lab(lab), axis=-1) > threshold


class Garment(NamedTuple):
    """What :func:`analyse` found: ``found`` False means undetermined (``why`` says why)."""
    found: bool
    why: str
    colour: str | None = None
    foreground: np.ndarray | None = None  # EDGE_THRESHOLD foreground
    region: np.ndarray | None = None      # the garment's own region: its colour, connected


def _nearest(lab: np.ndarray) -> np.ndarray:
    return np.argmin(np.linalg.norm(lab[:, None] - _PALETTE_LAB[None], axis=2), axis=1)


def _centre_weights(shape) -> np.ndarray:
    """A Gaussian on the frame's centre (sigma CENTRE_SIGMA of each side): catalogue photos centre
    the product, so on a model the garment sold outvotes the trousers and skin at the edges."""
    h, w = shape
    y = (np.arange(h) + 0.5) / h - 0.5
    x = (np.arange(w) + 0.5) / w - 0.5
    return np.exp(-(y[:, None] ** 2 + x[None] ** 2) / (2 * CENTRE_SIGMA ** 2))


def analyse(image) -> Garment:
    """Background, foreground, the garment's colour and its own region, or why there is none."""
    image = np.asarray(image)[..., :3]
    lab = srgb_to_lab(image)
    if plain_border_share(lab) < PLAIN_BORDER:
        return Garment(False, "no plain background: the border is the garment or a scene")
    distance = np.linalg.norm(lab - background_lab(lab), axis=-1)
    voters = distance > COLOUR_THRESHOLD
    if voters.mean() < MIN_FOREGROUND:
        return Garment(False, "nothing stands out from the background")
    # Each foreground pixel votes for its nearest name, so a shadow or a print moves the answer
    # less than a mean or median colour would; votes near the centre weigh more.
    votes = _nearest(lab[voters])
    winner = int(np.bincount(votes, weights=_centre_weights(voters.shape)[voters],
                             minlength=len(_NAMES)).argmax())
    foreground = distance > EDGE_THRESHOLD
    centre = np.median(lab[voters][votes == winner], axis=0)
    region = foreground & (np.linalg.norm(lab - centre, axis=-1) < GARMENT_DELTA_E)
    labels, n = ndimage.label(region)
    if n:  # the garment is its colour's largest connected piece; a model's shoes are not
        sizes = np.bincount(labels.ravel())[1:]
        region = labels == 1 + int(np.argmax(sizes))
    return Garment(True, "", _NAMES[winner], foreground, region)


def dominant_colour(image) -> str | None:
    """The palette name most of the garment's pixels are nearest to (in CIELAB); None when no
    garment is found (undetermined, see :func:`analyse`)."""
    return analyse(image).colour


def nearest_colour(lab) -> str:
    return _NAMES[int(np.argmin(np.linalg.norm(_PALETTE_LAB - np.asarray(lab), axis=1)))]


def colour_neighbours(name: str, k: int = NEIGHBOURS) -> list[str]:
    """``name`` and its ``k`` nearest palette colours in CIELAB (Navy Blue: Navy Blue, Charcoal,
    ...): the names a colour judge would not call wrong."""
    d = np.linalg.norm(_PALETTE_LAB - _PALETTE_LAB[_NAMES.index(name)], axis=1)
    return [_NAMES[i] for i in np.argsort(d)[: k + 1]]


def colour_correct(predicted: str | None, label: str | None) -> bool | None:
    """Whether ``predicted`` is ``label`` or a named neighbour; None when it cannot be scored: no
    label, an unknown or multi-coloured label, or no judged colour (no garment found)."""
    if label not in PALETTE or predicted is None:
        return None
    return predicted in colour_neighbours(label)


def garment_cut_off(garment: Garment) -> bool | None:
    """Whether the analysed garment runs out of the frame; None when no garment was found.

    Judges the garment, not the person wearing it: catalogue models run off the top (a head, or
    the shirt above a pair of jeans) and the bottom (the legs under a shirt) of whole-garment
    photos, never off the sides. So any foreground along more than SIDE_FRACTION of the left or
    right edge is a cut, while the top and bottom count only the garment's own region (its
    colour, connected) along more than END_FRACTION of the edge. A crop through the garment
    cuts it on the sides, or runs its own region off the top or bottom.
    """
    if not garment.found:
        return None
    fg, region = garment.foreground, garment.region
    sides = max(fg[:, 0].mean(), fg[:, -1].mean())
    ends = max(region[0].mean(), region[-1].mean())
    return bool(sides > SIDE_FRACTION or ends > END_FRACTION)


def cut_off(image) -> bool | None:
    """Whether the garment runs out of the frame (:func:`garment_cut_off`); None: undetermined."""
    return garment_cut_off(analyse(image))


def crop_through(image, keep: float = 0.6) -> np.ndarray:
    """The calibration's cut-off photo: the central ``keep`` of each side, a crop through any
    garment a catalogue photo centres (tests and benchmarks/garment_calibration.py)."""
    image = np.asarray(image)
    h, w = image.shape[:2]
    m = (1 - keep) / 2
    return image[int(m * h): int((1 - m) * h), int(m * w): int((1 - m) * w)]


def score_images(images, colour_labels):
    """One row per image: its colour label, the judged colour (None: no garment found), whether
    it is right (None when the label cannot be scored or no colour was judged), and whether the
    garment is cut off (None: undetermined). ``images`` are arrays or paths."""

    rows = []
    for item, label in zip(images, colour_labels):
        if isinstance(item, np.ndarray):
            image, name = item, None
        else:
            with Image.open(item) as im:
                image, name = np.asarray(im.convert("RGB")), str(item)
        garment = analyse(image)
        label = None if label is None or (isinstance(label, float) and np.isnan(label)) else str(label)
        rows.append({"image": name, "colour": label, "colour_judged": garment.colour,
                     "colour_correct": colour_correct(garment.colour, label),
                     "cut_off": garment_cut_off(garment)})
    return pd.DataFrame(rows, columns=["image", "colour", "colour_judged", "colour_correct", "cut_off"])


def summarise(table) -> dict:
    """Rates over the images each metric could judge, and the shares it could judge.

    ``colour_accuracy`` over ``colour_scored`` rows (a scorable label and a judged colour);
    ``colour_judged_share``: of the rows with a scorable label, the share whose colour was judged.
    ``cut_off_rate`` over ``cut_off_scored`` rows; ``cut_off_judged_share``: that count over
    ``images``; ``cut_off_low`` / ``cut_off_high``: the rate over every image with the
    undetermined ones counted as whole / as cut off. The judged share is not neutral (a model
    that crops more is judged less often, not cut off more often), so the bounds say what the
    rate can be. NaN where nothing could be judged."""
    nan = float("nan")
    scorable = table.colour.isin(list(PALETTE))
    scored = table.colour_correct[scorable].dropna().astype(bool)
    cut = table.cut_off.dropna().astype(bool)
    return {"colour_accuracy": float(scored.mean()) if len(scored) else nan,
            "colour_scored": int(len(scored)),
            "colour_judged_share": float(len(scored) / scorable.sum()) if scorable.any() else nan,
            "cut_off_rate": float(cut.mean()) if len(cut) else nan,
            "cut_off_scored": int(len(cut)),
            "cut_off_judged_share": float(len(cut) / len(table)) if len(table) else nan,
            "cut_off_low": float(cut.sum() / len(table)) if len(table) else nan,
            "cut_off_high": float((cut.sum() + len(table) - len(cut)) / len(table))
            if len(table) else nan,
            "images": int(len(table))}
