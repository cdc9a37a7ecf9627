"""Portrait (3:4) end to end on the demo data: training latents, preview samples, generated PNGs
and their settings, the app, and FID/KID all at [width, height] = [192, 256]."""

import json

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT
from PIL import Image
from test_evaluate import SmallExtractor
from tiny import tiny_unet

from fashion_sd import images
from fashion_sd.catalogue.captions import read_captions
from fashion_sd.config import ConfigError, load_config
from fashion_sd.evaluation import evaluate as ev
from fashion_sd.sd import models
from fashion_sd.serving.generate import Job, Sampler, generate_to_folder
from fashion_sd.training import data, run

SIZE = [192, 256]  # width, height: the catalogue's 3:4


@pytest.fixture(scope="module")
def portrait_parts(small_parts):
    keras.utils.set_random_seed(0)
    # the text and image encoders take any size; the decoder is built for its latent size
    return {**{k: small_parts[k] for k in ("text_encoder", "image_encoder")},
            "decoder": models.build_component("decoder", SIZE)}


@pytest.fixture(scope="module")
def build(portrait_parts):
    def make(source, resolution):
        w, h = images.image_size(resolution)
        keras.utils.set_random_seed(0)
        return models.Components(source, resolution, diffusion_model=tiny_unet((h // 8, w // 8)),
                                 **portrait_parts)
    return make


def test_sizes_and_their_checks():
    assert images.image_size(256) == (256, 256) and images.image_size([192, 256]) == (192, 256)
    assert images.size_label([192, 256]) == "192x256" and images.size_label(256) == "256"
    assert load_config(None, ["data.resolution=[384, 512]"]).data.resolution == [384, 512]
    with pytest.raises(ConfigError, match="data.resolution"):
        load_config(None, ["data.resolution=[384, 500]"])
    with pytest.raises(ConfigError, match="data.resolution"):
        load_config(None, ["data.resolution=[64, 64, 64]"])


def test_a_square_photo_is_padded_to_portrait_on_its_background(tmp_path):
    img = np.full((60, 60, 3), 200, np.uint8)
    img[20:40, 20:40] = (255, 0, 0)
    Image.fromarray(img).save(tmp_path / "sq.png")
    out = images.load_image(tmp_path / "sq.png", SIZE)
    assert out.shape == (256, 192, 3)
    assert (out[:20] == 200).all() and (out[-20:] == 200).all()  # padding above and below
    assert (out[128, 96] == (255, 0, 0)).all()  # the garment whole, in the middle


def test_upscale_warning_names_the_full_resolution_dataset(tmp_path):
    paths = []
    for i in range(5):
        Image.new("RGB", (60, 80), "white").save(tmp_path / f"{i}.jpg")
        paths.append(str(tmp_path / f"{i}.jpg"))
    factors = images.upscale_factors(paths, [384, 512])
    np.testing.assert_allclose(factors, 6.4)
    assert images.FULL_RESOLUTION_DATASET in images.upscale_warning(factors, [384, 512])
    assert images.upscale_warning(images.upscale_factors(paths, 64), 64) is None  # 0.8x


def test_portrait_run_samples_generation_app_and_fid(tmp_path, demo_captions, encoder_cache, build):
    # A third of the sample: the real VAE encodes each photo and its mirror at 256x192, which
    # took three of this test's six minutes for all 44.
    table = pd.read_csv(demo_captions)
    table = pd.concat([table[table.split == "train"].head(8), table[table.split == "val"].head(2),
                       table[table.split == "test"]])
    captions = tmp_path / "captions.csv"
    table.to_csv(captions, index=False)
    cfg = load_config(ROOT / "configs/demo.yaml", [
        f"data.captions={captions}", f"data.cache_dir={encoder_cache}",
        f"output.dir={tmp_path / 'run'}", "model.weights=random", "train.batch_size=8",
        "train.epochs=1", "train.sample_steps=2", "train.sample_seeds=[0]",
        "train.sample_prompts=[an image of a shirt]", f"data.resolution={json.dumps(SIZE)}",
        "eval.num_images=4", "eval.steps=2"])
    summary = run.train(cfg, progress=None, verbose=0, build=build)
    assert summary["status"] == "finished"
    comps = build(models.WeightsSource("random", "random", id="random-init(seed=42)"), SIZE)
    enc = data.encode_dataset(read_captions(cfg.data.captions), comps, cfg.data)
    assert enc.moments.shape[2:] == (32, 24, 8)  # latents 3:4 (height 32, width 24)
    assert (tmp_path / "run/samples/epoch_001.png").is_file()
    # generation: 3:4 PNGs whose settings say so
    sampler = Sampler(comps)
    record = {"weights": {}, "random_init": True, "label": "test", "resolution": SIZE}
    generate_to_folder(sampler, Job(["an image of a shirt"], [0, 1], 2, 7.5, batch_size=2),
                       tmp_path / "gen", record)
    pngs = sorted((tmp_path / "gen").glob("p*.png"))
    assert len(pngs) == 2
    from fashion_sd.serving.image_settings import ImageSettings

    for p in pngs:
        assert Image.open(p).size == (192, 256)
        assert ImageSettings.read_png(p).resolution == SIZE
    # the app
    from fashion_sd.serving.assistant import Assistant, Request

    app = Assistant(cfg, tmp_path / "run", build=build)
    result = app.generate(Request("an image of a shirt", steps=2, num_images=1))
    assert Image.open(result.paths[0]).size == (192, 256)
    # FID/KID on 3:4 images
    table = ev.evaluate(cfg, f"{cfg.output.dir}/checkpoints", include_base=True,
                        parts=ev.Parts(SmallExtractor(), build))
    scored = table[table.checkpoint != "real"]  # the real photos' row has no distance
    assert np.isfinite(scored.fid).all() and np.isfinite(scored.kid_mean).all()
    assert (table.checkpoint == "real").sum() == 1
    gen = next((tmp_path / "run/eval/images").rglob("*.png"))
    assert Image.open(gen).size == (192, 256)
