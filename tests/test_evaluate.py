"""evaluate_fid end to end on a tiny run: tables, plots, resumability, labels."""

from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from tiny import tiny_unet

from conftest import ROOT
from fashion_sd import evaluate as ev
from fashion_sd import models, run
from fashion_sd.config import load_config


class SmallExtractor:
    """8x8 grey thumbnails as 64-d features: cheap, deterministic, sensitive to the image."""

    name, preprocessing, comparable, batch_size = "test-thumbnails", "grey8", False, 16

    def __call__(self, images):
        from PIL import Image

        return np.stack([np.asarray(Image.fromarray(np.asarray(i)).convert("L").resize((8, 8)),
                                    np.float64).ravel() / 255 for i in images])


@pytest.fixture
def build(small_parts):
    def make(source, resolution):
        keras.utils.set_random_seed(0)
        return models.Components(source, resolution, diffusion_model=tiny_unet(resolution // 8),
                                 **small_parts)
    return make


@pytest.fixture
def trained(tmp_path, demo_captions, encoder_cache, build):
    cfg = load_config(ROOT / "configs/demo.yaml", [
        f"data.captions={demo_captions}", f"data.cache_dir={encoder_cache}",
        f"output.dir={tmp_path / 'run'}", "model.weights=random", "train.batch_size=8",
        "train.sample_every=0", "train.epochs=2", "eval.num_images=4", "eval.steps=2"])
    run.train(cfg, progress=None, verbose=0, build=build)
    return cfg


def test_scores_base_and_checkpoints(trained, build, monkeypatch):
    out = ev.evaluate(trained, f"{trained.output.dir}/checkpoints", include_base=True,
                      extractor=SmallExtractor(), build=build)
    assert out.checkpoint.tolist() == ["base", "epoch_001", "epoch_002"]
    assert out.epoch.tolist()[1:] == [1.0, 2.0]
    assert (out.n_generated == 4).all() and (out.n_real == 4).all()
    assert np.isfinite(out.fid).all() and np.isfinite(out.kid_mean).all()
    folder = Path(trained.output.dir) / "eval"
    csv = pd.read_csv(folder / "fid.csv")
    assert list(csv.columns) == ev.COLUMNS and len(csv) == 3
    md = (folder / "fid.md").read_text()
    assert md.count("**best**") == 1 and "NOT COMPARABLE" in md and "KID" in md
    for name in ("fid.png", "real_vs_generated.png"):
        assert (folder / name).stat().st_size > 1000
    assert len(list((folder / "images" / "epoch_002").glob("*.png"))) == 4
    # a re-run skips what is scored; --force recomputes the same numbers
    monkeypatch.setattr(ev, "generate_for", lambda *a, **k: pytest.fail("recomputed"))
    again = ev.evaluate(trained, f"{trained.output.dir}/checkpoints", include_base=True,
                        extractor=SmallExtractor(), build=build)
    pd.testing.assert_frame_equal(again, out)
    monkeypatch.undo()
    forced = ev.evaluate(trained, f"{trained.output.dir}/checkpoints/epoch_002.lora.safetensors",
                         force=True, extractor=SmallExtractor(), build=build)
    np.testing.assert_allclose(forced.set_index("checkpoint").fid["epoch_002"],
                               out.set_index("checkpoint").fid["epoch_002"], rtol=1e-9)


def test_input_errors(trained, tmp_path):
    with pytest.raises(ev.EvaluationError, match="nothing to score"):
        ev.evaluate(trained, None, include_base=False, extractor=SmallExtractor())
    with pytest.raises(ev.EvaluationError, match="no .lora.safetensors checkpoint found"):
        ev.evaluate(trained, str(tmp_path / "none*"), extractor=SmallExtractor())
    bad = tmp_path / "bad.lora.safetensors"
    bad.write_bytes(b"junk")
    with pytest.raises(run.lora.LoraError, match="not a readable safetensors"):
        ev.evaluate(trained, str(bad), extractor=SmallExtractor())
    plan = ev.make_plan(trained, "val", None, "x")  # eval.num_images=4 caps the 5 val rows
    assert plan.settings["n"] == 4 and plan.seeds == [42, 43, 44, 45]
    assert len(set(plan.prompts)) == 4 and len(plan.real_paths) == 5
