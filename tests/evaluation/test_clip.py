"""keras-hub's CLIP as the evaluation's judge: a random-init model saved as a keras-hub preset folder
by the test loads back through eval.clip: local:DIR and judges real images; offline errors say what
to download; random init only when asked, and labelled."""

import numpy as np
import pandas as pd
import pytest
from conftest import DEMO
from PIL import Image

from fashion_sd.evaluation import clip as C
from fashion_sd.sd import hub_clip

TINY = dict(embed_dim=16, image_resolution=32, vision_layers=1, vision_width=64,
            vision_patch_size=16, transformer_width=32, transformer_heads=2, transformer_layers=1)


@pytest.fixture(scope="module")
def tiny_preset(tmp_path_factory):
    model = C.random_clip("clip-vit-base-patch32", seed=3, **TINY)
    return model, hub_clip.save(model, tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture
def offline(monkeypatch):
    from keras_hub.src.utils import preset_utils

    def refuse(handle, path=None):
        raise ConnectionError(f"Failed to resolve 'api.kaggle.com' for {handle}")

    monkeypatch.setattr(preset_utils.kagglehub, "model_download", refuse)


def test_local_preset_loads_back_the_same_model(tiny_preset):
    model, folder = tiny_preset
    loaded, why = C.load_clip(f"local:{folder}", "clip-vit-large-patch14")
    assert why == "" and not loaded.random and loaded.resolution == 32
    images = [np.asarray(Image.open(p).convert("RGB"))
              for p in sorted((DEMO / "images").glob("*.jpg"))[:3]]
    x = C.preprocess(images, 32)
    np.testing.assert_allclose(loaded.embed_images(images),
                               np.asarray(model.get_vision_embeddings(x)), rtol=1e-5, atol=1e-6)
    texts = ["an image of a 2011 Casual Fall White Men's Sweater", "a photo of a watch"]
    emb = loaded.embed_texts(texts)
    assert emb.shape == (2, 16) and np.isfinite(emb).all()
    assert np.abs(emb[0] - emb[1]).max() > 1e-6  # the text matters


def test_text_features_are_read_at_the_end_token(tiny_preset):
    """Padding after the end token is masked out and never read: a text's embedding is the same
    alone or batched with a longer one."""
    model, folder = tiny_preset
    loaded, _ = C.load_clip(f"local:{folder}", "clip-vit-large-patch14")
    short = "a shoe"
    alone = loaded.embed_texts([short])
    batched = loaded.embed_texts([short, "an image of a 2012 Formal Winter Black Women's Jacket"])
    np.testing.assert_allclose(alone[0], batched[0], rtol=1e-5, atol=1e-6)


def test_keras_hub_settings_hold_after_building_and_loading(tiny_preset):
    """What keras-hub leaves as transformers would not (fashion_sd/sd/hub_clip.py): a fresh
    encoder's final text LayerNorm has epsilon 1e-6 and its vision position ids are all 0. Ours
    have 1e-5 and 0..n-1, built and loaded back from a preset alike; if keras-hub changes its
    defaults, the first assertions say so."""
    import keras_hub

    fresh = keras_hub.models.CLIPTextEncoder(vocabulary_size=49408, embedding_dim=32, hidden_dim=32,
                                             num_layers=1, num_heads=2, intermediate_dim=64)
    assert fresh.layer_norm.epsilon == 1e-6
    vision = keras_hub.models.CLIPVisionEncoder(patch_size=16, hidden_dim=64, num_layers=1,
                                                num_heads=2, intermediate_dim=64,
                                                image_shape=(32, 32, 3))
    assert not np.asarray(vision.embedding.position_ids).any()
    model, folder = tiny_preset
    loaded, _ = C.load_clip(f"local:{folder}", "clip-vit-large-patch14")
    for backbone in (model, loaded.model):
        assert backbone.text_encoder.layer_norm.epsilon == 1e-5
        ids = backbone.vision_encoder.embedding.position_ids
        np.testing.assert_array_equal(ids, [range(5)])
        assert {w.dtype for w in backbone.weights if w is not ids} == {"float32"}


def test_openai_padding_leaves_one_end_token():
    ids = np.array([[49406, 320, 49407, 49407, 49407], [49406, 1, 2, 3, 49407]], np.int32)
    np.testing.assert_array_equal(hub_clip.openai_padding(ids),
                                  [[49406, 320, 49407, 0, 0], [49406, 1, 2, 3, 49407]])


def test_a_kerascv_preset_is_refused_saying_so(tmp_path):
    """local:DIR named a KerasCV CLIP preset before keras-hub; one is refused, never misread."""
    (tmp_path / "config.json").write_text(
        '{"module": "keras_cv.src.models.feature_extractor.clip.clip_model", "class_name": "CLIP", '
        '"config": {"embed_dim": 16}, "registered_name": "keras_cv>CLIP", '
        '"weights": "model.weights.h5"}')
    with pytest.raises(C.ClipUnavailable, match="KerasCV CLIP preset, which the judge no longer"):
        C.load_clip(f"local:{tmp_path}", "clip-vit-large-patch14")


def test_preprocess_is_openai_clips_centre_crop():
    image = np.zeros((80, 60, 3), np.uint8)
    image[:, :, 0] = 255
    x = C.preprocess([image], 24)
    assert x.shape == (1, 24, 24, 3)
    np.testing.assert_allclose(x[0, :, :, 0], (1 - C.CLIP_MEAN[0]) / C.CLIP_STD[0], rtol=1e-5)
    np.testing.assert_allclose(x[0, :, :, 2], (0 - C.CLIP_MEAN[2]) / C.CLIP_STD[2], rtol=1e-5)


def test_offline_pretrained_names_what_to_download(offline):
    with pytest.raises(C.ClipUnavailable, match="keras/clip/keras/clip_vit_large_patch14/") as info:
        C.load_clip("pretrained", "clip-vit-large-patch14")
    assert "local:DIR" in str(info.value) and "ConnectionError" in str(info.value)


def test_offline_auto_turns_clip_off_and_says_why(offline):
    model, why = C.load_clip("auto", "clip-vit-large-patch14")
    assert model is None and "eval.clip: auto" in why and "local:DIR" in why


def test_local_folder_errors(tmp_path):
    with pytest.raises(C.ClipUnavailable, match="no config.json"):
        C.load_clip(f"local:{tmp_path}", "clip-vit-large-patch14")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(C.ClipUnavailable, match="cannot load the CLIP preset"):
        C.load_clip(f"local:{tmp_path}", "clip-vit-large-patch14")


def test_random_init_only_when_asked_and_labelled(monkeypatch):
    monkeypatch.setitem(C.ARCHITECTURES, "tiny", TINY)
    model, why = C.load_clip("random", "tiny", seed=5)
    assert why == "" and model.random and "RANDOM-INIT" in model.label
    assert C.load_clip("none", "tiny") == (None, "eval.clip: none")


def test_evaluate_folder_with_clip(tiny_preset, tmp_path, demo_captions, capsys):
    """evaluate_fid.py --images with CLIP weights: every CLIP column per image, and the summary."""
    from fashion_sd import cli

    _, folder = tiny_preset
    out = tmp_path / "judged"
    rc = cli.main(["evaluate", "--images", str(DEMO / "images"), "--captions", str(demo_captions),
                   "--out", str(out), "--set", f"eval.clip=local:{folder}"])
    assert rc == 0, capsys.readouterr().err
    table = pd.read_csv(out / "garment.csv")
    assert len(table) == len(pd.read_csv(demo_captions))
    for column in ("clip_score", "type_judged", "type_top1", "type_top3", "on_model",
                   "colour_clip", "colour_top1", "gender_judged", "gender_top1"):
        assert table[column].notna().all(), column
    # each image's own 100 cos, unclamped (docs/evaluation.md: the set's mean is clamped)
    assert ((-100 <= table.clip_score) & (table.clip_score <= 100)).all()
    assert set(table.gender_judged) <= {"Men", "Women", "Boys", "Girls", "Unisex"}
    md = (out / "garment.md").read_text()
    assert "CLIP: local:tiny-clip" in md and "type top-1" in md and "gender top-1" in md
