"""Folders compared directly (evaluate --images DIR [DIR ...] --real DIR): a folder of the
catalogue's photos against itself scores 0 on every distance, and a blurred copy of it more, in
the same run; the table is written with its summary; bad folders are refused first."""

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT
from PIL import Image, ImageFilter

from fashion_sd.config import load_config
from fashion_sd.evaluation import folders
from fashion_sd.preflight import InputError

DEMO = ROOT / "data" / "demo" / "images"


class Thumbnails:
    """8x8 grey thumbnails as 64-d features: cheap, deterministic, sensitive to a blur."""

    name, preprocessing, comparable, batch_size, protocol = "test-thumbnails", "grey8", False, 8, "clean"

    def __call__(self, images):
        return np.stack([np.asarray(Image.fromarray(np.asarray(i)).convert("L").resize((8, 8)),
                                    np.float64).ravel() / 255 for i in images])


class ThumbnailClip:
    """A CLIP stand-in whose image embeddings are the thumbnails: what CMMD compares."""

    label = "thumbnail-clip"

    def embed_images(self, images):
        return Thumbnails()(images)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """12 of the catalogue's photos, and a blurred copy of each."""
    root = tmp_path_factory.mktemp("folders")
    real, blurred = root / "real", root / "blurred"
    real.mkdir(), blurred.mkdir()
    for path in sorted(DEMO.glob("*.jpg"))[:12]:
        shutil.copy(path, real / path.name)
        with Image.open(path) as im:
            im.convert("RGB").filter(ImageFilter.GaussianBlur(4)).save(blurred / f"{path.stem}.png")
    return real, blurred


def config(tmp_path, *extra):
    return load_config(ROOT / "configs/demo.yaml", [f"data.cache_dir={tmp_path / 'cache'}",
                                                    "eval.bootstrap=10", *extra])


def test_a_folder_against_itself_scores_zero_and_a_blurred_copy_more(photos, tmp_path):
    transformers = pytest.importorskip("transformers")
    from fashion_sd.evaluation import dinov2

    real, blurred = photos
    saved = tmp_path / "dinov2"
    transformers.Dinov2Model(transformers.Dinov2Config(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64)).save_pretrained(saved)
    networks = folders.Networks(Thumbnails(), ThumbnailClip(), "", dinov2.load(f"hf:{saved}", 28))
    out = tmp_path / "out"
    table = folders.compare_folders(config(tmp_path), [real, blurred], real, out, networks)
    same, blur = table.iloc[0], table.iloc[1]
    assert (same.n_generated, same.n_real, blur.n_generated) == (12, 12, 12)
    for column in ("fid", "cmmd", "fd_dinov2"):
        assert abs(same[column]) < 1e-6, column
        assert blur[column] > 1e3 * max(abs(same[column]), 1e-9), column
        assert blur[f"{column}_se"] > 0, column
    # KID's unbiased estimator leaves each set's diagonal out, so a set against itself (not an
    # independent sample of it) comes out below 0: only the order is asserted
    assert same.kid_mean < blur.kid_mean
    for prefix in ("", "inception_"):
        assert same[prefix + "precision"] == same[prefix + "recall"] == 1.0
        assert same[prefix + "coverage"] == 1.0 and same[prefix + "density"] == pytest.approx(1.0)
        assert blur[prefix + "coverage"] <= 1.0
    written = pd.read_csv(out / "distances.csv")
    assert list(written.columns) == folders.COLUMNS and len(written) == 2
    md = (out / "distances.md").read_text()
    assert str(blurred) in md and "bootstrap standard error" in md and "FID: biased" in md


def test_the_command_compares_folders_and_refuses_bad_ones(photos, tmp_path, capsys):
    from fashion_sd import cli

    real, blurred = photos
    base = ["--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "eval.clip=none",
            "--set", "eval.dinov2=none", "--set", "eval.backend=auto", "--set", "eval.bootstrap=0"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["evaluate", "--images", str(empty), "--real", str(real), "--out",
                     str(tmp_path / "o"), *base]) == 2
    assert "--images" in capsys.readouterr().err
    assert cli.main(["evaluate", "--images", str(real), "--real", str(real), "--captions",
                     "x.csv", "--out", str(tmp_path / "o"), *base]) == 2
    out = tmp_path / "cmp"
    rc = cli.main(["evaluate", "--images", str(real), str(blurred), "--real", str(real),
                   "--out", str(out), *base])
    assert rc == 0, capsys.readouterr().err
    table = pd.read_csv(out / "distances.csv")
    assert table.fid.iloc[0] == pytest.approx(0, abs=1e-6) and table.fid.iloc[1] > 0
    assert table.cmmd.isna().all() and "CMMD off: eval.clip: none" in table.notes.iloc[0]
    assert "FD-DINOv2 off: eval.dinov2: none" in table.notes.iloc[0]


def test_a_folder_with_fewer_than_two_images_is_refused(tmp_path):
    (tmp_path / "one").mkdir()
    shutil.copy(next(DEMO.glob("*.jpg")), tmp_path / "one")
    with pytest.raises(InputError, match="1 image"):
        folders.image_files(tmp_path / "one", "--real")
