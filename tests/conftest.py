from __future__ import annotations

import importlib.util
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# With the interop extra installed, torch's triton (which carries its own LLVM) loads before
# anything else: diffusers importing it after TensorFlow in one pytest process segfaults. A helper
# script that imported TensorFlow first (tests/mirrored_check.py) never needs triton: skip it there.
if "tensorflow" not in sys.modules and importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
# Tests mirror the package's stages in sub-folders and share a few helpers across them (a tiny
# training setup in training/test_run.py, a small extractor in evaluation/test_evaluate.py):
# every folder is importable whatever subset pytest collects.
for _folder in sorted(Path(__file__).parent.iterdir()):
    if _folder.is_dir() and _folder.name not in ("data", "__pycache__") and str(_folder) not in sys.path:
        sys.path.append(str(_folder))
DEMO = ROOT / "data" / "demo"
HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"


def write_styles(path: Path, lines: list[str], header: str = HEADER) -> Path:
    """A styles.csv written the way the real one is: raw lines, no quoting."""
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


def write_image(path: Path, mode: str = "RGB", fmt: str = "JPEG", size=(60, 80)) -> Path:
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))  # another image per name
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)
    return path


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture
def demo_dir() -> Path:
    return DEMO


@pytest.fixture(scope="session")
def demo_captions(tmp_path_factory) -> Path:
    """captions.csv for the bundled sample, built once per session."""
    from fashion_sd.catalogue import captions
    from fashion_sd.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    result = captions.build_captions(DEMO / "styles.csv", cfg.captions, cfg.seed, DEMO / "images")
    out, _ = captions.write_outputs(result, tmp_path_factory.mktemp("captions") / "captions.csv")
    return out


@pytest.fixture(scope="session")
def small_parts():
    """KerasCV's real text encoder, VAE encoder and decoder at 64 px, random init, built once."""
    import keras

    from fashion_sd.sd.models import build_component

    keras.utils.set_random_seed(0)
    return {name: build_component(name, 64) for name in ("text_encoder", "image_encoder", "decoder")}


@pytest.fixture(scope="session")
def encoder_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("encoder-cache")
