"""evaluate_fid end to end on a tiny run: tables, plots, resumability, labels."""

from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT
from PIL import Image
from tiny import FakeClip, tiny_unet

from fashion_sd.config import load_config
from fashion_sd.evaluation import evaluate as ev
from fashion_sd.evaluation.judge import Judge
from fashion_sd.images import load_image
from fashion_sd.sd import models
from fashion_sd.training import run


class SmallExtractor:
    """8x8 grey thumbnails as 64-d features: cheap, deterministic, sensitive to the image."""

    name, preprocessing, comparable, batch_size = "test-thumbnails", "grey8", False, 16
    protocol = "clean"

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
        "train.sample_every=0", "train.epochs=2", "eval.num_images=4", "eval.steps=2",
        "eval.clip=none", "eval.dinov2=none"])
    run.train(cfg, progress=None, verbose=0, build=build)
    return cfg


def fake_judge(cfg):
    plan = ev.make_plan(cfg, "test", None)
    return Judge(FakeClip(), plan.vocabulary, plan.colour_names)


def test_scores_base_and_checkpoints(trained, build, monkeypatch):
    out = ev.evaluate(trained, f"{trained.output.dir}/checkpoints", include_base=True,
                      parts=ev.Parts(SmallExtractor(), build, fake_judge(trained)))
    # the real photos' row first: each judged column's ceiling, no distance of its own
    assert out.checkpoint.tolist() == ["real", "base", "epoch_001", "epoch_002"]
    assert out.epoch.tolist()[2:] == [1.0, 2.0]
    assert (out.n_generated == 4).all() and (out.n_real == 4).all()
    models = out[out.checkpoint != "real"]
    assert np.isfinite(models.fid).all() and np.isfinite(models.kid_mean).all()
    real = out.iloc[0]
    assert pd.isna(real.fid) and pd.isna(real.kid_mean) and not real.selected
    # the catalogue's photos on their plain backgrounds: every cut-off judged, none cut off
    assert real.cut_off_judged_share == 1.0 and real.cut_off_rate == 0.0
    assert 0 < real.colour_chance < 1 and 0 < real.gender_chance < 1 and 0 < real.type_chance < 1
    # four images each: KID subsets of two, said in the table and the summary
    assert (models.kid_subset_size == 2).all()
    for column in ("clip_score", "type_top1", "type_top3", "colour_top1", "gender_top1",
                   "on_model_rate", "cut_off_judged_share"):
        assert out[column].notna().all(), column
    # noise from a tiny random U-Net shows no garment on a plain background: undetermined for
    # cut-off (NaN, with the share it could judge: 0), never called wrong
    judged = models.cut_off_judged_share > 0
    assert (models.cut_off_rate.notna() == judged).all()
    assert out.selected.sum() == 1 and not out.selected.iloc[:2].any()  # never real or base
    assert out.kid_mean[out.selected].iloc[0] == out.kid_mean.iloc[2:].min()  # eval.select: kid
    folder = Path(trained.output.dir) / "eval"
    csv = pd.read_csv(folder / "fid.csv")
    assert list(csv.columns) == ev.COLUMNS and len(csv) == 4
    assert (folder / "images" / "real" / "scores.csv").is_file()
    md = (folder / "fid.md").read_text()
    assert md.count("**best**") == 1 and "NOT COMPARABLE" in md and "KID" in md
    assert "CLIP score" in md and "subsets of 2" in md and "real_vs_generated.png" in md
    for name in ("fid.png", "real_vs_generated.png"):
        assert (folder / name).stat().st_size > 1000
    assert len(list((folder / "images" / "epoch_002").glob("*.png"))) == 4
    judged = pd.read_csv(folder / "images" / "epoch_002" / "scores.csv")
    assert len(judged) == 4 and {"prompt", "seed", "clip_score", "type_judged"} <= set(judged)
    np.testing.assert_allclose(judged.clip_score.mean(),
                               out.set_index("checkpoint").clip_score["epoch_002"])
    # a re-run skips what is scored; --force recomputes the same numbers
    monkeypatch.setattr(ev, "generate_for", lambda *a, **k: pytest.fail("recomputed"))
    again = ev.evaluate(trained, f"{trained.output.dir}/checkpoints", include_base=True,
                        parts=ev.Parts(SmallExtractor(), build, fake_judge(trained)))
    pd.testing.assert_frame_equal(again, out)
    monkeypatch.undo()
    forced = ev.evaluate(trained, f"{trained.output.dir}/checkpoints/epoch_002.lora.safetensors",
                         force=True, parts=ev.Parts(SmallExtractor(), build, fake_judge(trained)))
    np.testing.assert_allclose(forced.set_index("checkpoint").fid["epoch_002"],
                               out.set_index("checkpoint").fid["epoch_002"], rtol=1e-9)


def test_two_evaluations_into_one_folder_at_once_keep_both_rows(trained, build, monkeypatch):
    """A second evaluation writes its row while the first is still generating: the first once
    rewrote the table it had read at its start, and the second's row was lost (both exited 0)."""
    parts = lambda: ev.Parts(SmallExtractor(), build, fake_judge(trained))  # noqa: E731
    generate = ev.generate_for

    def while_another_runs(*args, **kwargs):
        monkeypatch.setattr(ev, "generate_for", generate)
        ev.evaluate(trained, f"{trained.output.dir}/checkpoints/epoch_002.lora.safetensors",
                    parts=parts())
        return generate(*args, **kwargs)

    monkeypatch.setattr(ev, "generate_for", while_another_runs)
    out = ev.evaluate(trained, None, include_base=True, parts=parts())
    assert out.checkpoint.tolist() == ["real", "base", "epoch_002"]
    table = pd.read_csv(Path(trained.output.dir) / "eval" / "fid.csv")
    assert table.checkpoint.tolist() == ["real", "base", "epoch_002"]
    assert table.fid.iloc[1:].notna().all()


def test_input_errors(trained, tmp_path):
    with pytest.raises(ev.EvaluationError, match="nothing to score"):
        ev.evaluate(trained, None, include_base=False, parts=ev.Parts(SmallExtractor()))
    with pytest.raises(ev.EvaluationError, match="no .lora.safetensors checkpoint found"):
        ev.evaluate(trained, str(tmp_path / "none*"), parts=ev.Parts(SmallExtractor()))
    bad = tmp_path / "bad.lora.safetensors"
    bad.write_bytes(b"junk")
    with pytest.raises(run.lora.LoraError, match="not a readable safetensors"):
        ev.evaluate(trained, str(bad), parts=ev.Parts(SmallExtractor()))
    plan = ev.make_plan(trained, "val", None, "x")  # eval.num_images=4 caps the 5 val rows
    assert plan.settings["n"] == 4 and plan.seeds == [42, 43, 44, 45]
    assert len(set(plan.prompts)) == 4 and len(plan.real_paths) == 5


def test_a_model_that_reproduces_the_real_set_scores_zero(trained, build, monkeypatch):
    """The real images pass through the training loader before Inception, so generated images
    equal to them score FID 0 (to float64 round-off: |FID| < 1e-6 of the features' variance).
    Before, real photos went in at their own size and generated ones at the training size."""
    from fashion_sd.evaluation.inception import untrained_extractor

    def reproduce(sampler, plan, batch_size, folder, progress=None):
        return np.stack([load_image(p, trained.data.resolution) for p in plan.real_paths])

    monkeypatch.setattr(ev, "generate_for", reproduce)
    extractor = untrained_extractor("clean")
    out = ev.evaluate(trained, None, include_base=True, parts=ev.Parts(extractor, build),
                      scope=ev.Scope(out=Path(trained.output.dir) / "eval_same"))
    features = extractor(reproduce(None, ev.make_plan(trained, "test", None), 4, None))
    scale = float(np.trace(np.cov(features, rowvar=False)))
    base = out.set_index("checkpoint").loc["base"]
    assert abs(float(base.fid)) < 1e-6 * scale
    assert base.protocol == "clean" and not base.comparable


def test_select_best_by_each_column():
    table = pd.DataFrame({"checkpoint": ["base", "e1", "e2", "e3"],
                          "fid": [9.0, 3.0, 2.0, 4.0], "kid_mean": [9.0, 1.0, 3.0, 2.0],
                          "clip_score": [20.0, 25.0, 21.0, 30.0],
                          "type_top1": [0.9, 0.2, 0.6, 0.5]})
    assert ev.select_best(table, "fid") == (2, "fid")
    assert ev.select_best(table, "kid") == (1, "kid_mean")
    assert ev.select_best(table, "clip") == (3, "clip_score")
    assert ev.select_best(table, "type_accuracy") == (2, "type_top1")  # not the base's 0.9
    table["clip_score"] = np.nan  # CLIP was off: falls back to KID
    assert ev.select_best(table, "clip") == (1, "kid_mean")
    # never by a zero-shot column that the real photos score near chance (1/4 of the way up)
    real = {"checkpoint": "real", "type_top1": 0.30, "type_chance": 0.1}
    with_real = pd.concat([pd.DataFrame([real]), table], ignore_index=True)
    assert ev.select_best(with_real, "type_accuracy") == (2, "kid_mean")  # 0.30 < 0.1 + 0.225
    with_real.loc[0, "type_top1"] = 0.9
    assert ev.select_best(with_real, "type_accuracy") == (3, "type_top1")


def test_evaluation_while_training(tmp_path, demo_captions, encoder_cache, build, monkeypatch):
    """train.eval_every: each epoch's checkpoint lands in eval/fid.csv as evaluate_fid.py would
    score it, so evaluate_fid.py afterwards finds nothing left to do."""
    from fashion_sd.evaluation import inception

    monkeypatch.setattr(inception, "load_extractor", lambda *a, **k: SmallExtractor())
    cfg = load_config(ROOT / "configs/demo.yaml", [
        f"data.captions={demo_captions}", f"data.cache_dir={encoder_cache}",
        f"output.dir={tmp_path / 'run'}", "model.weights=random", "train.batch_size=8",
        "train.sample_every=0", "train.epochs=2", "train.eval_every=1", "train.eval_images=4",
        "eval.steps=2", "eval.clip=none"])
    run.train(cfg, progress=None, verbose=0, build=build)
    table = pd.read_csv(Path(cfg.output.dir) / "eval" / "fid.csv")
    assert table.checkpoint.tolist() == ["epoch_001", "epoch_002"]
    assert table.epoch.tolist() == [1.0, 2.0] and table.selected.sum() == 1
    # the garment metrics reach the table (noise shows no garment: the share judged says so)
    assert np.isfinite(table.kid_mean).all() and table.colour_judged_share.notna().all()
    monkeypatch.setattr(ev, "generate_for", lambda *a, **k: pytest.fail("scored twice"))
    again = ev.evaluate(cfg, f"{cfg.output.dir}/checkpoints", scope=ev.Scope(num_images=4),
                        parts=ev.Parts(SmallExtractor(), build))
    assert again.checkpoint.tolist() == ["epoch_001", "epoch_002"]


def test_scoring_networks_are_float32_under_a_mixed_precision_run(tmp_path, demo_captions):
    """Evaluation during a bf16 run builds Inception and the CLIP judge in float32, and the run's
    policy is back afterwards; the real images' statistics are keyed apart from older bf16 ones."""
    cfg = load_config(ROOT / "configs/demo.yaml", [
        f"data.captions={demo_captions}", f"data.cache_dir={tmp_path / 'cache'}",
        f"output.dir={tmp_path / 'run'}", "eval.clip=random",
        "eval.clip_preset=clip-vit-base-patch32"])
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        with pytest.warns(UserWarning, match="RANDOM-INIT"):  # offline: the untrained Inception
            scorer = ev.Scorer(cfg, ev.Scope(num_images=2, out=tmp_path / "eval"))
        judge = scorer.judge
        assert keras.mixed_precision.dtype_policy().name == "mixed_bfloat16"
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    from fashion_sd.evaluation.inception import untrained_extractor

    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    float32 = untrained_extractor()  # the same seeded weights, built under float32
    np.testing.assert_allclose(scorer.extractor(images), float32(images), rtol=1e-5, atol=1e-6)
    dtypes = {layer.compute_dtype for layer in judge.clip.model._flatten_layers()
              if hasattr(layer, "compute_dtype")}
    assert dtypes == {"float32"}, dtypes


def test_the_distances_beside_fid_use_the_same_images(trained, build, tmp_path):
    """CMMD on the judge's CLIP embeddings, FD-DINOv2 on a small random DINOv2 (transformers'
    folder, converted), each equal to its function on the images the table's row was made from,
    with bootstrap standard errors; PRDC is off at 4 images, with the reason in the notes."""
    transformers = pytest.importorskip("transformers")
    from fashion_sd.evaluation import dinov2
    from fashion_sd.evaluation import distances as d

    folder = tmp_path / "dinov2"
    transformers.Dinov2Model(transformers.Dinov2Config(
        image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, layerscale_value=0.5)).save_pretrained(folder)
    dino = dinov2.load(f"hf:{folder}", size=28)
    out = tmp_path / "eval"
    table = ev.evaluate(trained, f"{trained.output.dir}/checkpoints/epoch_002.lora.safetensors",
                        scope=ev.Scope(out=out),
                        parts=ev.Parts(SmallExtractor(), build, fake_judge(trained), dinov2=dino))
    row = table.set_index("checkpoint").loc["epoch_002"]
    generated = [np.asarray(Image.open(p).convert("RGB"))
                 for p in sorted((out / "images" / "epoch_002").glob("*.png"))]
    plan = ev.make_plan(trained, "test", None)
    real = [load_image(p, trained.data.resolution) for p in plan.real_paths]
    clip = fake_judge(trained).clip
    assert row.cmmd == pytest.approx(d.cmmd(clip.embed_images(real), clip.embed_images(generated)))
    assert row.fd_dinov2 == pytest.approx(d.frechet_distance_of_features(
        dinov2.features(real, dino), dinov2.features(generated, dino)), rel=1e-6)
    assert row.fid == pytest.approx(d.frechet_distance_of_features(
        SmallExtractor()(real), SmallExtractor()(generated)), rel=1e-9)
    for column in ("fid_se", "cmmd_se", "fd_dinov2_se"):
        assert np.isfinite(row[column]) and row[column] > 0, column
    assert pd.isna(row.precision) and pd.isna(row.inception_coverage)  # k = 5 needs 6 images
    assert "PRDC: not computable" in row.notes and "CMMD:" in row.notes
    assert row.dinov2_model.startswith("DINOv2 hf:dinov2")
    md = (out / "fid.md").read_text()
    assert "FD-DINOv2 ± se" in md and f"FD-DINOv2 and PRDC on {row.dinov2_model}" in md
    assert "bootstrap standard error" in md and "PRDC: not computable" in md
    # the real row has no distance of its own
    assert table.set_index("checkpoint").loc["real", ["cmmd", "fd_dinov2"]].isna().all()
