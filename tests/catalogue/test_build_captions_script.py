import importlib.util
import shutil

import pandas as pd
import pytest
from conftest import ROOT, write_styles

from fashion_sd.config import load_config


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("build_captions", ROOT / "scripts/build_captions.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_writes_captions_rejected_and_config(script, tmp_path, demo_dir, capsys):
    out = tmp_path / "run" / "captions.csv"
    rc = script.main(["--config", str(ROOT / "configs/demo.yaml"), "--styles",
                      str(demo_dir / "styles.csv"), "--images", str(demo_dir / "images"),
                      "--out", str(out), "--set", "captions.split={train: 0.5, val: 0.25, test: 0.25}"])
    assert rc == 0
    t = pd.read_csv(out)
    assert list(t.columns[:4]) == ["id", "image_path", "caption", "split"]
    assert "productDisplayName" in t.columns and len(t) == 44
    assert t.split.value_counts().to_dict() == {"train": 22, "val": 11, "test": 11}
    rejected = pd.read_csv(out.parent / "rejected.csv")
    assert len(rejected) == 4 and set(rejected.stage) == {"filter"}
    cfg = load_config(out.parent / "captions.config.yaml")
    assert cfg.data.captions == str(out) and cfg.captions.split.val == 0.25
    text = capsys.readouterr().out
    assert "rows read: 48" in text and "kept: 44 (train 22, val 11, test 11)" in text
    assert not list(out.parent.glob("*.tmp"))


def test_dry_run_writes_nothing(script, tmp_path, demo_dir, capsys):
    out = tmp_path / "captions.csv"
    rc = script.main(["--styles", str(demo_dir / "styles.csv"), "--out", str(out), "--dry-run"])
    assert rc == 0 and list(tmp_path.iterdir()) == []
    text = capsys.readouterr().out
    samples = text.split("sample captions:")[1].strip().splitlines()[:10]
    assert len(samples) == 10 and all(s.strip().startswith("an image of a") for s in samples)
    assert "images: not checked" in text


def test_bad_config_stops_before_work(script, tmp_path, demo_dir, capsys):
    out = tmp_path / "captions.csv"
    rc = script.main(["--styles", str(demo_dir / "styles.csv"), "--out", str(out),
                      "--set", "captions.split.train=0.9"])
    assert rc == 2 and not out.exists()
    assert "sum to 1" in capsys.readouterr().err


def test_failed_build_keeps_previous_output(script, tmp_path, capsys):
    out = tmp_path / "captions.csv"
    out.write_text("previous\n")
    bad = write_styles(tmp_path / "s.csv", ["1,Men"], header="id,gender")
    assert script.main(["--styles", str(bad), "--out", str(out)]) == 2
    assert out.read_text() == "previous\n"
    assert "missing required column(s)" in capsys.readouterr().err


def test_kaggle_offline_says_what_to_do(script, tmp_path, monkeypatch, capsys):
    import kagglehub

    def offline(handle, *a, **k):
        raise ConnectionError("Failed to resolve 'www.kaggle.com'")

    monkeypatch.setattr(kagglehub, "dataset_download", offline)
    rc = script.main(["--kaggle", "paramaggarwal/fashion-product-images-small",
                      "--out", str(tmp_path / "c.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and "--styles" in err and "--images" in err and "ConnectionError" in err


def test_kaggle_download_layout(script, tmp_path, monkeypatch, demo_dir):
    import kagglehub

    root = tmp_path / "cache" / "myntradataset"
    shutil.copytree(demo_dir, root)
    monkeypatch.setattr(kagglehub, "dataset_download", lambda handle, *a, **k: str(tmp_path / "cache"))
    out = tmp_path / "c.csv"
    assert script.main(["--kaggle", "x/y", "--out", str(out)]) == 0
    t = pd.read_csv(out)
    assert len(t) == 44 and t.image_path.str.contains("myntradataset/images").all()
