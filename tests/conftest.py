from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"


def write_styles(path: Path, lines: list[str], header: str = HEADER) -> Path:
    """A styles.csv written the way the real one is: raw lines, no quoting."""
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


def write_image(path: Path, mode: str = "RGB", fmt: str = "JPEG", size=(60, 80)) -> Path:
    rng = np.random.default_rng(len(path.name))
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)
    return path


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture
def demo_dir() -> Path:
    return DEMO
