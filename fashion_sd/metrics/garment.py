"""Weight-free garment metrics: the garment's colour against the catalogue's colour names, and
whether the garment is cut off by the frame. numpy only, so they run on any folder of images.

Both start from one foreground mask: pixels far (in CIELAB) from the photo's own background,
which is estimated from its border, as catalogue photos are shot on plain backgrounds.
"""

from __future__ import annotations

import numpy as np

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


def background_lab(lab: np.ndarray) -> np.ndarray:
    """The photo's background: the median colour of its one-pixel border."""
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    return np.median(border, axis=0)


def foreground_mask(image, threshold: float = 12.0) -> np.ndarray:
    """Pixels whose CIELAB distance (Delta E 1976) from the background exceeds ``threshold``."""
    lab = srgb_to_lab(np.asarray(image)[..., :3])
    return np.linalg.norm(lab - background_lab(lab), axis=-1) > threshold


def dominant_colour(image, threshold: float = 8.0) -> str | None:
    """The palette name most of the garment's pixels are nearest to (in CIELAB): each foreground
    pixel votes for its nearest name, so a shadow or a print moves the answer less than a mean
    or median colour would. None when almost nothing stands out from the background (under 2%
    of the image)."""
    image = np.asarray(image)[..., :3]
    mask = foreground_mask(image, threshold)
    if mask.mean() < 0.02:
        return None
    lab = srgb_to_lab(image[mask])
    votes = np.argmin(np.linalg.norm(lab[:, None] - _PALETTE_LAB[None], axis=2), axis=1)
    return _NAMES[int(np.bincount(votes, minlength=len(_NAMES)).argmax())]


def nearest_colour(lab) -> str:
    return _NAMES[int(np.argmin(np.linalg.norm(_PALETTE_LAB - np.asarray(lab), axis=1)))]


def colour_neighbours(name: str, k: int = NEIGHBOURS) -> list[str]:
    """``name`` and its ``k`` nearest palette colours in CIELAB (Navy Blue: Navy Blue, Charcoal,
    ...): the names a colour judge would not call wrong."""
    d = np.linalg.norm(_PALETTE_LAB - _PALETTE_LAB[_NAMES.index(name)], axis=1)
    return [_NAMES[i] for i in np.argsort(d)[: k + 1]]


def colour_correct(predicted: str | None, label: str | None) -> bool | None:
    """Whether ``predicted`` is ``label`` or a named neighbour; None when it cannot be scored
    (no label, an unknown or multi-coloured label)."""
    if label not in PALETTE:
        return None
    return predicted is not None and predicted in colour_neighbours(label)


def cut_off(image, side_fraction: float = 0.4, threshold: float = 12.0) -> bool:
    """Whether the garment runs out of the frame: on some side, more than ``side_fraction`` of
    the edge pixels are foreground (a garment shot whole touches an edge at most in a few
    pixels; one cropped through runs along it)."""
    mask = foreground_mask(image, threshold)
    sides = (mask[0], mask[-1], mask[:, 0], mask[:, -1])
    return any(side.mean() > side_fraction for side in sides)


def score_images(images, colour_labels):
    """One row per image: its colour label, the judged colour, whether it is right (None when the
    label cannot be scored), and whether the garment is cut off. ``images`` are arrays or paths."""
    import pandas as pd
    from PIL import Image

    rows = []
    for item, label in zip(images, colour_labels):
        if isinstance(item, np.ndarray):
            image, name = item, None
        else:
            with Image.open(item) as im:
                image, name = np.asarray(im.convert("RGB")), str(item)
        predicted = dominant_colour(image)
        label = None if label is None or (isinstance(label, float) and np.isnan(label)) else str(label)
        rows.append({"image": name, "colour": label, "colour_judged": predicted,
                     "colour_correct": colour_correct(predicted, label), "cut_off": cut_off(image)})
    return pd.DataFrame(rows, columns=["image", "colour", "colour_judged", "colour_correct", "cut_off"])


def summarise(table) -> dict:
    """Colour accuracy over the scorable rows and the cut-off rate, with their counts."""
    scored = table.colour_correct.dropna().astype(bool)
    return {"colour_accuracy": float(scored.mean()) if len(scored) else float("nan"),
            "colour_scored": int(len(scored)),
            "cut_off_rate": float(table.cut_off.mean()) if len(table) else float("nan"),
            "images": int(len(table))}
