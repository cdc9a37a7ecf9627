"""Whole training runs (train() as train.py calls it) with a tiny U-Net and KerasCV's real
encoders: outputs, resume equivalence, refusals, non-finite stops, weights errors."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT
from safetensors.numpy import load_file
from tiny import tiny_unet

from fashion_sd.config import load_config
from fashion_sd.sd import lora_file, models
from fashion_sd.training import data, run
from fashion_sd.training.run import TrainingError


@pytest.fixture
def build(small_parts):
    def make(source, resolution):
        return models.Components(source, resolution, diffusion_model=tiny_unet(resolution // 8),
                                 **small_parts)
    return make


def config(tmp_path, demo_captions, encoder_cache, *overrides, name="run"):
    return load_config(ROOT / "configs/demo.yaml", [
        f"data.captions={demo_captions}", f"data.cache_dir={encoder_cache}",
        f"output.dir={tmp_path / name}", "model.weights=random", "train.batch_size=4",
        "train.sample_every=0", "train.deterministic=true", "train.epochs=2", *overrides])


def train(cfg, build, **kw):
    return run.train(cfg, progress=None, verbose=0, build=build, **kw)


def test_a_run_leaves_everything_behind(tmp_path, demo_captions, encoder_cache, build):
    cfg = config(tmp_path, demo_captions, encoder_cache, "train.sample_every=1",
                 "train.sample_steps=2", "train.keep_last=1")
    summary = train(cfg, build)
    out = tmp_path / "run"
    assert summary["status"] == "finished" and summary["step"] == 16 and summary["epoch"] == 2
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == [
        "best.README.md", "best.lora.safetensors", "best.samples.png",
        "epoch_002.lora.safetensors", "last.README.md", "last.lora.safetensors",
        "last.samples.png", "train_state.safetensors"]  # with each one's model card and grid
    hist = pd.read_csv(out / "history.csv")
    assert list(hist.columns) == ["epoch", "step", "loss", "val_loss", "lr", "skipped_steps",
                                  "overflow_steps", "loss_scale", "seconds"]
    assert hist.epoch.tolist() == [1.0, 2.0] and hist.step.tolist() == [8, 16]
    assert np.isfinite(hist.val_loss).all() and (hist.skipped_steps == 0).all()
    assert (hist.overflow_steps == 0).all() and hist.loss_scale.isna().all()  # float32: no scaling
    for name in ("loss.png", "samples/epoch_001.png", "samples/epoch_002.png", "config.yaml"):
        assert (out / name).stat().st_size > 1000, name
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    record = json.loads((out / "run.json").read_text())
    assert record["random_init"] is True and record["weights"]["kind"] == "random"
    assert record["trainable_parameters"] == 2 * 4 * ((32 + 32) * 6 + (768 + 32) * 2)
    assert record["status"] == "finished" and record["train_images"] == 35
    # what actually ran, and why XLA is off here
    assert (record["precision"], record["jit_compile"]) == ("float32", False)
    assert "deterministic" in record["jit_reason"]  # Keras runs it without XLA; not "XLA: on"
    assert (record["attention"], record["lora_form"], record["loss_scaling"]) == ("fused", "separate", False)
    assert set(record["versions"]) >= {"tensorflow", "keras", "keras-cv"}
    assert load_config(out / "config.yaml") == cfg
    meta = lora_file.read(ck / "last.lora.safetensors")[1]
    assert meta["base_weights"] == "random-init(seed=42)" and meta["random_init"] == "true"
    assert meta["caption_template"] == cfg.captions.template and meta["step"] == "16"
    # every output has the permissions any new file gets (safetensors' writer once left the
    # checkpoints and the train state 0600: unreadable to a group sharing the runs)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777)
             for p in out.rglob("*") if p.is_file()}
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, demo_captions, encoder_cache, build):
    train(config(tmp_path, demo_captions, encoder_cache, name="straight"), build)
    first = train(config(tmp_path, demo_captions, encoder_cache, "train.max_steps=5",
                         name="resumed"), build)
    assert first["status"] == "stopped" and first["stop_reason"] == "max_steps"
    assert first["step"] == 5
    out = tmp_path / "resumed"
    assert lora_file.read(out / "checkpoints/last.lora.safetensors")[1]["step"] == "5"
    assert not list((out / "checkpoints").glob("epoch_*"))  # no epoch finished yet
    second = train(config(tmp_path, demo_captions, encoder_cache, name="resumed"), build,
                   resume=True)
    assert second["status"] == "finished" and second["step"] == 16
    a = load_file(str(tmp_path / "straight/checkpoints/last.lora.safetensors"))
    b = load_file(str(out / "checkpoints/last.lora.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert pd.read_csv(out / "history.csv").epoch.tolist() == [0.625, 1.0, 2.0]
    # resuming a finished run does nothing, and run.json keeps the finished run's summary
    record = (out / "run.json").read_bytes()
    again = train(config(tmp_path, demo_captions, encoder_cache, name="resumed"), build, resume=True)
    assert (out / "run.json").read_bytes() == record
    assert again["status"] == "finished" and again["step"] == 16


def test_refusals_before_any_work(tmp_path, demo_captions, encoder_cache, build):
    cfg = config(tmp_path, demo_captions, encoder_cache, "train.max_steps=1")
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(cfg, build, resume=True)
    train(cfg, build)
    with pytest.raises(TrainingError, match="already holds a run.*--resume"):
        train(cfg, build)
    changed = config(tmp_path, demo_captions, encoder_cache, "lora.rank=8")
    with pytest.raises(TrainingError, match="lora.rank: was 4, now 8"):
        train(changed, build, resume=True)
    summary = train(cfg, build, fresh=True)  # --fresh starts over
    assert summary["step"] == 1
    few = config(tmp_path, demo_captions, encoder_cache, "train.batch_size=64", name="few")
    with pytest.raises(TrainingError, match="35 training rows cannot fill one batch"):
        train(few, build)


def test_nonfinite_losses_stop_the_run_and_keep_the_last_checkpoint(
        tmp_path, demo_captions, encoder_cache, build, monkeypatch):
    cfg = config(tmp_path, demo_captions, encoder_cache, "train.epochs=1")
    train(cfg, build)
    ck = tmp_path / "run/checkpoints"
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    real = data.train_dataset

    def poisoned(*args, **kwargs):
        return real(*args, **kwargs).map(lambda b: {**b, "moments": b["moments"] * np.nan})

    monkeypatch.setattr(data, "train_dataset", poisoned)
    cfg2 = config(tmp_path, demo_captions, encoder_cache, "train.epochs=2", "train.max_nonfinite=3")
    with pytest.raises(TrainingError, match="3 non-finite losses in a row.*last.lora.safetensors"):
        train(cfg2, build, resume=True)
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before
    record = json.loads((tmp_path / "run/run.json").read_text())
    assert record["stop_reason"] == "nonfinite" and record["skipped_steps"] == 3


def test_pretrained_offline_fails_at_start(tmp_path, demo_captions, encoder_cache, monkeypatch):
    def offline(*a, **k):
        raise Exception("URL fetch failure: [Errno -2] Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    built = []
    cfg = config(tmp_path, demo_captions, encoder_cache, "model.weights=pretrained")
    with pytest.raises(models.WeightsError, match="kcv_diffusion_model.h5.*local:DIR"):
        run.train(cfg, progress=None, verbose=0, build=lambda *a: built.append(a))
    assert not built
    with pytest.warns(UserWarning, match="RANDOM-INIT"):
        source = models.resolve_weights("auto")
    assert source.is_random and "RANDOM" in source.label


def test_local_weights_folder_errors(tmp_path):
    with pytest.raises(models.WeightsError, match="folder not found"):
        models.resolve_weights(f"local:{tmp_path / 'none'}")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "kcv_encoder.h5").write_bytes(b"x")
    with pytest.raises(models.WeightsError, match="missing kcv_diffusion_model.weights.h5"):
        models.resolve_weights(f"local:{tmp_path / 'w'}")


def test_small_components_save_and_load_back(tmp_path, small_parts):
    source = models.WeightsSource("random", "random", id="random-init(seed=0)")
    comps = models.Components(source, 64, **small_parts)
    models.save_components(comps, tmp_path / "w")
    files = models.find_local(tmp_path / "w", ("text_encoder", "image_encoder", "decoder"))
    assert json.loads((tmp_path / "w/source.json").read_text())["components"]["decoder"] == \
        "kcv_decoder.weights.h5"
    keras.utils.set_random_seed(123)  # other random weights, then overwritten by the files
    for name, path in files.items():
        loaded = models.build_component(name, 64, path)
        for a, b in zip(small_parts[name].weights, loaded.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_train_script_errors(tmp_path):
    def script(*args):
        return subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), *args],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)

    bad = script("--config", str(ROOT / "configs/demo.yaml"), "--set", "lora.rank=0")
    assert bad.returncode == 2 and "'lora.rank' must be > 0" in bad.stderr
    missing = script("--config", str(ROOT / "configs/demo.yaml"),
                     "--set", f"data.captions={tmp_path / 'nope.csv'}")
    assert missing.returncode == 2 and "captions file not found" in missing.stderr


def test_kerascv_published_h5_layout_loads(tmp_path, small_parts):
    """`local:DIR` with KerasCV's legacy .h5 names, written in their (Keras 2) layout."""
    import h5py
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    folder = tmp_path / "published"
    folder.mkdir()
    for name in ("text_encoder", "image_encoder", "decoder"):
        with h5py.File(folder / models.WEIGHT_FILES[name].name, "w") as f:
            save_weights_to_hdf5_group(f, small_parts[name])
    files = models.find_local(folder, ("text_encoder", "image_encoder", "decoder"))
    assert files["decoder"].name == "kcv_decoder.h5"
    keras.utils.set_random_seed(321)
    loaded = models.build_component("decoder", 64, files["decoder"])
    for a, b in zip(small_parts["decoder"].weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    (folder / "kcv_decoder.h5").write_bytes(b"broken")
    with pytest.raises(models.WeightsError, match="kcv_decoder.h5: cannot load it into SD 1.x's Decoder"):
        models.build_component("decoder", 64, folder / "kcv_decoder.h5")


def test_fp16_loss_scale_floor_stops_the_run_with_its_reason(tmp_path, demo_captions, encoder_cache,
                                                             build):
    import keras

    # Keras starts the scale at 2^15: a floor above it stops the run at its first step.
    cfg = config(tmp_path, demo_captions, encoder_cache, "train.precision=mixed_float16",
                 "train.min_loss_scale=1e9", "train.sample_every=0")
    with pytest.raises(run.TrainingError, match=r"loss scale fell below train.min_loss_scale"):
        train(cfg, build)
    assert keras.mixed_precision.dtype_policy().name == "float32"  # the caller's policy is back
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["stop_reason"] == "loss_scale" and record["loss_scaling"] is True
    assert record["precision"] == "mixed_float16" and record["step"] == 1
    assert not (tmp_path / "run" / "checkpoints" / "last.lora.safetensors").exists()


def test_xla_with_determinism_is_refused_before_any_work(tmp_path, demo_captions, encoder_cache):
    with pytest.raises(Exception, match="'train.jit_compile' true cannot hold with train.deterministic"):
        config(tmp_path, demo_captions, encoder_cache, "train.jit_compile=true")


def test_fit_segments_resume_mid_epoch_then_whole_epochs():
    assert run.fit_segments(0, 8, 16) == [(0, 2, 8)]
    assert run.fit_segments(5, 8, 16) == [(0, 1, 3), (1, 2, 8)]  # the rest of epoch 1 first
    assert run.fit_segments(8, 8, 16) == [(1, 2, 8)]
    assert run.fit_segments(8, 8, 13) == [(1, 2, 8)]  # max_steps inside epoch 2: the guard stops it
    assert run.fit_segments(3, 8, 5) == [(0, 1, 5)]
    assert run.fit_segments(16, 8, 16) == []


def test_an_empty_val_split_trains_and_says_best_is_by_train_loss(tmp_path, demo_captions,
                                                                  encoder_cache, build, caplog):
    from fashion_sd.catalogue.captions import read_captions

    table = read_captions(demo_captions)  # image paths made absolute
    table["split"] = table.split.replace("val", "test")  # no val rows at all
    table.to_csv(tmp_path / "captions.csv", index=False)
    cfg = config(tmp_path, tmp_path / "captions.csv", encoder_cache, "train.epochs=1")
    with caplog.at_level("WARNING"):
        summary = train(cfg, build)
    assert "val split is empty" in caplog.text
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["best_by"] == "train_loss" and record["val_images"] == 0
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert summary["best_train_loss"] == pytest.approx(hist.loss.min())
    assert summary["best_val_loss"] is None
    assert (tmp_path / "run" / "checkpoints" / "best.lora.safetensors").is_file()
