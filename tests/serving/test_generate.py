"""KerasCV's sampler on our components: seeded, per-image reproducible."""

import numpy as np
import pytest
from tiny import tiny_unet

from fashion_sd.config import LoraConfig
from fashion_sd.sd import models
from fashion_sd.serving.generate import Sampler


@pytest.fixture(scope="module")
def sampler(small_parts):
    import keras

    keras.utils.set_random_seed(0)
    source = models.WeightsSource("random", "random", id="random-init(seed=0)")
    return Sampler(models.Components(source, 64, diffusion_model=tiny_unet(8), **small_parts))


def test_progress_is_reported_after_every_sampling_step(sampler):
    prompt = "an image of a Women's Dress"
    calls = []
    with_progress = sampler.generate(prompt, [3], steps=4, on_step=lambda *a: calls.append(a))
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    np.testing.assert_array_equal(with_progress, sampler.generate(prompt, [3], steps=4))
    assert sampler.diffusion_model is sampler.comps.diffusion_model  # never swapped


def test_same_seed_same_pixels(sampler):
    prompt = "an image of a 2011 Casual Fall White Men's Sweater"
    a = sampler.generate(prompt, [0, 1], steps=3)
    assert a.shape == (2, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(sampler.generate(prompt, [0, 1], steps=3), a)
    assert not np.array_equal(a[0], a[1])
    # An image depends on its own seed, not on its batch (up to float rounding of a level).
    b = sampler.generate(prompt, [1], steps=3)
    assert np.abs(a[1].astype(int) - b[0].astype(int)).max() <= 1


def test_prompt_matters_and_empty_prompt_is_refused(sampler):
    a = sampler.generate("an image of a 2011 Casual Fall White Men's Sweater", [0], steps=2)
    b = sampler.generate("an image of a 2012 Casual Summer Grey Women's Dress", [0], steps=2)
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="empty prompt"):
        sampler.generate("  ", [0])


def test_long_prompt_is_truncated_with_a_warning(sampler, caplog):
    long = " ".join(["extraordinarily"] * 60)
    sampler.generate(long, [0], steps=1)
    assert "prompt over 77 tokens truncated" in caplog.text


def test_generate_to_folder(sampler, tmp_path):
    import json

    from fashion_sd.serving.generate import Job, generate_to_folder

    record = {"label": sampler.comps.source.label, "weights": sampler.comps.source.to_dict()}
    side = generate_to_folder(sampler, Job(["an image of a Men's T-Shirt", "an image of a Women's Dress"],
                                           [3, 4, 5], steps=2, guidance=7.5, batch_size=2),
                              tmp_path, record=record)
    names = sorted(p.name for p in tmp_path.glob("p*_s*.png"))
    assert names == ["p000_s3.png", "p000_s4.png", "p000_s5.png", "p001_s3.png", "p001_s4.png",
                     "p001_s5.png"]
    assert (tmp_path / "contact_sheet.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "generate.json").read_text())
    assert saved["steps"] == 2 and saved["seeds"] == [3, 4, 5] and len(saved["images"]) == 6
    assert saved == json.loads(json.dumps(side, default=str))
    again = tmp_path / "again"
    generate_to_folder(sampler, Job(["an image of a Men's T-Shirt"], [3, 4, 5], 2, 7.5, batch_size=2),
                       again, record)  # same seed, same settings: the same file, byte for byte
    assert (again / "p000_s4.png").read_bytes() == (tmp_path / "p000_s4.png").read_bytes()
    with pytest.raises(ValueError, match="empty prompt"):
        generate_to_folder(sampler, Job([" "], [0], 2, 7.5), tmp_path / "x", record)


def test_incompatible_lora_is_refused(tmp_path):
    from fashion_sd.sd import lora

    layers = lora.apply_lora(tiny_unet(8, channels=64), LoraConfig(rank=2, alpha=2.0, targets=["to_q"]))
    path = lora.save_lora(tmp_path / "wide.lora.safetensors", layers, LoraConfig(rank=2, alpha=2.0, targets=["to_q"]))
    with pytest.raises(lora.LoraError, match="made for another base model"):
        lora.merge_lora(tiny_unet(8, channels=32), path)


def test_generate_script_input_errors(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    def script(*args):
        return subprocess.run([sys.executable, str(ROOT / "scripts/generate.py"),
                               "--config", str(ROOT / "configs/demo.yaml"), "--out", str(tmp_path),
                               *args], capture_output=True, text=True, timeout=300)

    r = script("--prompt", "a shirt", "--lora", str(tmp_path / "none.lora.safetensors"))
    assert r.returncode == 2 and "LoRA checkpoint not found" in r.stderr
    r = script("--prompt", "a shirt", "--resolution", "100")
    assert r.returncode == 2 and "multiple of 64" in r.stderr
    r = script("--prompt", "  ")
    assert r.returncode == 2 and "empty" in r.stderr
    r = script()
    assert r.returncode == 2 and "no prompt" in r.stderr
    bad = tmp_path / "bad.lora.safetensors"
    bad.write_bytes(b"junk")
    r = script("--prompt", "a shirt", "--lora", str(bad))
    assert r.returncode == 2 and "not a readable safetensors" in r.stderr
    r = script("--from-png", str(tmp_path / "none.png"))
    assert r.returncode == 2 and "--from-png" in r.stderr and "not found" in r.stderr
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    r = script("--from-png", str(tmp_path / "plain.png"))
    assert r.returncode == 2 and "no fashion-sd settings" in r.stderr


def test_attribute_prompts():
    import argparse
    import importlib.util

    from conftest import ROOT  # noqa: F401

    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts/generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = argparse.Namespace(prompt=["a first prompt"], prompts_file=None, year="2011",
                              usage="Casual", season="Fall", colour="White", gender="Men",
                              article="Sweaters")
    from fashion_sd.caption_template import PAPER_TEMPLATE

    assert mod.prompts_from_args(args, PAPER_TEMPLATE) == [
        "a first prompt", "an image of a 2011 Casual Fall White Men's Sweater"]


def test_png_metadata_reproduces_the_image(sampler, tmp_path):
    from PIL import Image

    from fashion_sd.serving.generate import Job, generate_to_folder, read_png_settings

    record = {"label": "x", "weights": {"requested": "random", "id": "random-init(seed=0)"},
              "lora": None, "lora_strength": None, "resolution": 64, "noise": "philox",
              "rounding": "round"}
    generate_to_folder(sampler, Job(["an image of a 2011 Casual Fall White Men's Sweater"], [7],
                                    steps=2, guidance=5.0, negative_prompt="blurry"),
                       tmp_path / "a", record=record)
    png = tmp_path / "a" / "p000_s7.png"
    s = read_png_settings(png)
    assert s == {"prompt": "an image of a 2011 Casual Fall White Men's Sweater",
                 "negative_prompt": "blurry", "seed": 7, "steps": 2, "guidance": 5.0,
                 "resolution": 64, "weights": "random", "weights_id": "random-init(seed=0)",
                 "model_seed": None, "random_init": None, "checkpoint": None,
                 "lora": None, "lora_strength": None, "batch_seeds": [7], "noise": "philox",
                 "rounding": "round", "made_by": "fashion-sd generate"}
    again = sampler.generate(s["prompt"], [s["seed"]], s["steps"], s["guidance"], s["negative_prompt"])
    np.testing.assert_array_equal(again[0], np.asarray(Image.open(png)))
    plain = tmp_path / "plain.png"
    Image.fromarray(again[0]).save(plain)
    with pytest.raises(ValueError, match="no fashion-sd settings"):
        read_png_settings(plain)


def test_from_png_keeps_one_image_of_its_batch(sampler, tmp_path):
    from PIL import Image

    from fashion_sd.serving.generate import Job, generate_to_folder, read_png_settings

    record = {"label": "x", "weights": {"requested": "random"}}
    generate_to_folder(sampler, Job(["an image of a Women's Dress"], [1, 2, 3], 2, 7.5,
                                    batch_size=2), tmp_path / "a", record)
    s = read_png_settings(tmp_path / "a" / "p000_s2.png")
    assert s["batch_seeds"] == [1, 2]
    side = generate_to_folder(sampler, Job([s["prompt"]], s["batch_seeds"], 2, 7.5, batch_size=2,
                                           keep=[2]), tmp_path / "b", record)
    assert [f["file"] for f in side["images"]] == ["p000_s2.png"]
    assert not (tmp_path / "b" / "p000_s1.png").exists()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b" / "p000_s2.png")),
                                  np.asarray(Image.open(tmp_path / "a" / "p000_s2.png")))


def test_a_png_from_before_rounding_was_recorded_is_remade_as_it_was_made(sampler, tmp_path):
    """PNGs written before 2026-12-07 record neither noise nor rounding: they started from
    keras.random.normal and truncated their pixels (KerasCV's way), and --from-png remakes them
    so; images made today round, which removes truncation's half a grey level of darkening."""
    import argparse

    from PIL import Image

    from fashion_sd.commands.generate import apply_png_settings
    from fashion_sd.config import load_config
    from fashion_sd.serving.image_settings import ImageSettings

    prompt = "an image of a 2011 Casual Fall White Men's Sweater"
    then = Sampler(sampler.comps, noise="keras", rounding="truncate").generate(prompt, [5], 2, 7.5)
    old = ImageSettings(prompt=prompt, seed=5, steps=2, guidance=7.5, resolution=64,
                        weights="random", batch_seeds=[5])
    assert old.noise is None and old.rounding is None  # as those PNGs read
    old.save_png(tmp_path / "old.png", then[0])
    args = argparse.Namespace(from_png=str(tmp_path / "old.png"))
    apply_png_settings(args, load_config(None, []))
    assert (args.noise, args.rounding) == ("keras", "truncate")
    again = Sampler(sampler.comps, noise=args.noise, rounding=args.rounding).generate(
        args.prompt[0], args.batch_seeds, args.steps, args.guidance)
    np.testing.assert_array_equal(again[0], np.asarray(Image.open(tmp_path / "old.png")))
    # the same floats rounded: never darker, and brighter by half a level on average where
    # the decoder's output was not clipped to black or white
    now = Sampler(sampler.comps, noise="keras").generate(prompt, [5], 2, 7.5).astype(np.int16)
    lift = now - then.astype(np.int16)
    inside = (then > 0) & (then < 254)
    assert set(np.unique(lift)) == {0, 1} and inside.sum() > 1000
    assert 0.45 < lift[inside].mean() < 0.55, lift[inside].mean()
    with pytest.raises(ValueError, match="rounding 'floor': use one of round, truncate"):
        Sampler(sampler.comps, rounding="floor")


def test_from_png_keeps_a_lora_strength_of_zero(tmp_path):
    """0 is a strength (the LoRA's file, folded in at nothing), not an unset one: it came back
    as 1.0. And the stored settings' kinds are the ones generation checks against."""
    import argparse
    import dataclasses

    from fashion_sd.commands.generate import apply_png_settings
    from fashion_sd.config import load_config
    from fashion_sd.sd import ddim
    from fashion_sd.serving import image_settings
    from fashion_sd.serving.image_settings import ImageSettings

    for strength, back in ((0.0, 0.0), (0.5, 0.5), (None, 1.0)):
        ImageSettings(prompt="a shirt", seed=1, steps=2, guidance=7.5, lora="x.lora.safetensors",
                      lora_strength=strength).save_png(tmp_path / "s.png",
                                                       np.zeros((8, 8, 3), np.uint8))
        args = argparse.Namespace(from_png=str(tmp_path / "s.png"))
        apply_png_settings(args, load_config(None, []))
        assert args.lora_strength == back
    kinds = image_settings._KINDS
    assert set(kinds) == {f.name for f in dataclasses.fields(ImageSettings)}
    assert [v for v in (*ddim.NOISES, *ddim.ROUNDINGS)
            if not kinds["noise" if v in ddim.NOISES else "rounding"][1](v)] == []
