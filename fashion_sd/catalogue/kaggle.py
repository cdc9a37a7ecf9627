"""Fetching the Kaggle catalogue with kagglehub when online."""

from __future__ import annotations

from pathlib import Path

from fashion_sd.errors import FashionSDError

DEFAULT_HANDLE = "paramaggarwal/fashion-product-images-small"


class KaggleError(FashionSDError, RuntimeError):
    """The dataset could not be fetched; the message says how to provide it by hand."""


def download(handle: str = DEFAULT_HANDLE) -> tuple[Path, Path]:
    """Download (or reuse kagglehub's cache of) ``handle``; return its styles.csv and image folder."""
    hint = ("download it by hand from https://www.kaggle.com/datasets/" + handle +
            " and pass --styles PATH/styles.csv --images PATH/images")
    try:
        import kagglehub

        root = Path(kagglehub.dataset_download(handle))
    except Exception as exc:  # kagglehub raises requests', urllib3's or its own errors offline
        raise KaggleError(f"could not fetch {handle!r} with kagglehub ({type(exc).__name__}: "
                          f"{exc}). Offline or no Kaggle access? {hint}") from None
    styles = sorted(root.rglob("styles.csv"), key=lambda p: len(p.parts))
    if not styles:
        raise KaggleError(f"{root}: the download of {handle!r} has no styles.csv; {hint}")
    images = styles[0].parent / "images"
    if not images.is_dir():
        raise KaggleError(f"{images}: no image folder beside {styles[0]}; {hint}")
    return styles[0], images
