"""Our DINOv2 judge (FD-DINOv2's features) against the references' own code: a small random-init
transformers ``Dinov2Model`` is saved as a folder and read through ``hf:DIR`` (keras-hub's
converter, cached), and must give transformers' ``pooler_output``; the hub model's position
resampling is checked against PyTorch's ``interpolate`` as facebookresearch/dinov2 calls it; the
preprocessing against torchvision's transforms as dgm-eval composes them. No download.

The tests that need no torch (errors, resampling identities, PIL preprocessing) run on any
backend; the rest skip without torch and transformers (the JAX environment has neither)."""

import json

import numpy as np
import pytest
from conftest import DEMO
from PIL import Image

from fashion_sd.evaluation import dinov2 as D

TRAINED = 98  # 7 x 7 patches of 14: resampled to 4 x 4 (56 px) and 10 x 10 (140 px)
PHOTOS = sorted((DEMO / "images").glob("*.jpg"))[:4]


def _images() -> list[np.ndarray]:
    """The bundled photos (60 x 80: enlarged to 224) and a larger one (shrunk: antialiased)."""
    big = np.random.default_rng(1).integers(0, 256, (300, 260, 3), dtype=np.uint8)
    return [np.asarray(Image.open(p).convert("RGB")) for p in PHOTOS] + [big]


def _save(folder, **config):
    """A small random DINOv2 saved as save_pretrained writes it; (folder, eval-mode model)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    settings = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                    image_size=TRAINED, layerscale_value=0.5)  # layer scale != 1 is exercised
    model = transformers.Dinov2Model(transformers.Dinov2Config(**{**settings, **config})).eval()
    with torch.no_grad():  # trained-looking position embeddings and layer scales, not init's
        model.embeddings.position_embeddings.normal_()
        for layer in model.encoder.layer:
            layer.layer_scale1.lambda1.uniform_(0.1, 1.0)
            layer.layer_scale2.lambda1.uniform_(0.1, 1.0)
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("hf-dinov2") / "tiny-dinov2")


def _pooler(model, pixels: np.ndarray) -> np.ndarray:
    """transformers' FD-DINOv2 feature (class token after the final LayerNorm) of NHWC pixels."""
    import torch

    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).pooler_output.numpy()


@pytest.mark.parametrize("size", [TRAINED, 56, 140])
def test_features_equal_transformers_pooler_output(reference, size):
    folder, model = reference
    ours = D.load(f"hf:{folder}", size=size, positions="transformers")
    images = _images()
    pixels = D.preprocess(images, size)
    feats = D.features(images, ours, batch_size=2)  # batches of 2, 2 and 1
    assert feats.dtype == np.float64 and feats.shape == (len(images), 32)
    np.testing.assert_allclose(feats, _pooler(model, pixels), rtol=1e-5, atol=1e-5)


def _hub_resampling(self, embeddings, height, width):
    """facebookresearch/dinov2's ``interpolate_pos_encoding`` as its hub models run it
    (interpolate_offset 0.1, so PyTorch samples with scale_factor (grid + 0.1) / trained)."""
    import torch

    pos = self.position_embeddings
    trained, grid = int(round((pos.shape[1] - 1) ** 0.5)), height // self.patch_size
    if grid == trained:
        return pos
    patches = pos[:, 1:].reshape(1, trained, trained, -1).permute(0, 3, 1, 2)
    scale = (grid + D.HUB_OFFSET) / trained
    patches = torch.nn.functional.interpolate(patches, scale_factor=(scale, scale),
                                              mode="bicubic", antialias=False)
    assert patches.shape[-2:] == (grid, grid)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1)


@pytest.mark.parametrize("size", [56, 140])
def test_hub_positions_equal_the_hub_models_resampling(reference, size, monkeypatch):
    folder, model = reference
    from transformers.models.dinov2 import modeling_dinov2

    monkeypatch.setattr(modeling_dinov2.Dinov2Embeddings, "interpolate_pos_encoding",
                        _hub_resampling)
    pixels = D.preprocess(_images(), size)
    hub = D.load(f"hf:{folder}", size=size, positions="dinov2")
    ours = np.asarray(hub.encoder.predict_on_batch({"images": pixels}))
    np.testing.assert_allclose(ours, _pooler(model, pixels), rtol=1e-5, atol=1e-5)
    # The two resamplings give different features (by far more than the tolerance above).
    other = D.load(f"hf:{folder}", size=size, positions="transformers")
    assert np.abs(other.encoder.predict_on_batch({"images": pixels}) - ours).max() > 1e-4


@pytest.mark.parametrize("positions", D.POSITIONS)
def test_resampling_equals_pytorch_at_vit_l_geometry(positions):
    """37 x 37 trained positions (518 px) to 16 x 16 (224 px), as dgm-eval runs ViT-L/14."""
    torch = pytest.importorskip("torch")
    pos = np.random.default_rng(0).normal(size=(1, 1 + 37 * 37, 8)).astype(np.float32)
    grid = torch.from_numpy(pos[:, 1:]).reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    kwargs = ({"size": (16, 16)} if positions == "transformers"
              else {"scale_factor": ((16 + D.HUB_OFFSET) / 37,) * 2})
    theirs = torch.nn.functional.interpolate(grid, mode="bicubic", align_corners=False, **kwargs)
    theirs = np.concatenate([pos[:, :1], theirs.permute(0, 2, 3, 1).reshape(1, 256, 8).numpy()], 1)
    np.testing.assert_allclose(D.interpolate_positions(pos, 16, positions), theirs, atol=1e-5)


@pytest.mark.parametrize("antialias", [False, True])
def test_keras_hubs_own_resampling_is_not_pytorchs(antialias):
    """Why :func:`interpolate_positions` exists: if this fails, keras-hub now resamples as
    PyTorch does and the hand-written resampling can go."""
    pytest.importorskip("keras_hub")
    from keras_hub.src.models.dinov2.dinov2_layers import DINOV2Embedding

    pos = np.random.default_rng(0).normal(size=(1, 1 + 37 * 37, 8)).astype(np.float32)
    theirs = np.asarray(DINOV2Embedding._interpolate_position_embeddings(
        pos, patch_size=14, source_shape=(518, 518), target_shape=(224, 224), antialias=antialias))
    assert np.abs(theirs - D.interpolate_positions(pos, 16, "transformers")).max() > 0.05


def test_features_stay_float32_under_a_mixed_precision_policy(reference):
    """An evaluation inside a mixed-precision training run must not compute in bfloat16."""
    import keras

    folder, model = reference
    pixels = D.preprocess(_images()[:2], 56)
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        ours = D.load(f"hf:{folder}", size=56, positions="transformers")
    finally:
        keras.config.set_dtype_policy(before)
    assert ours.backbone.compute_dtype == "float32"
    np.testing.assert_allclose(ours.encoder.predict_on_batch({"images": pixels}),
                               _pooler(model, pixels), rtol=1e-5, atol=1e-5)


def test_swiglu_variant_equals_transformers(tmp_path):
    folder, model = _save(tmp_path / "swiglu", use_swiglu_ffn=True)
    ours = D.load(f"hf:{folder}", size=56, positions="transformers")
    pixels = D.preprocess(_images()[:2], 56)
    np.testing.assert_allclose(ours.encoder.predict_on_batch({"images": pixels}),
                               _pooler(model, pixels), rtol=1e-5, atol=1e-5)


def test_the_conversion_is_cached_beside_the_folder(reference, monkeypatch):
    folder, _ = reference
    first = D.load(f"hf:{folder}", size=56)
    cached = list((folder / D.CACHE_NAME).glob("dinov2-keras-hub-*.npz"))
    assert len(cached) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("converted again although the cache is current")

    import keras_hub

    with monkeypatch.context() as m:
        m.setattr(keras_hub.models.DINOV2Backbone, "from_preset", refuse)
        again = D.load(f"hf:{folder}", size=56)
    images = _images()[:2]
    np.testing.assert_array_equal(D.features(images, again), D.features(images, first))
    config = folder / "config.json"  # a changed source converts again and replaces the cache
    config.write_text(config.read_text() + "\n")
    D.load(f"hf:{folder}", size=56)
    now = list((folder / D.CACHE_NAME).glob("dinov2-keras-hub-*.npz"))
    assert len(now) == 1 and now != cached


def test_a_read_only_folder_still_loads(reference, monkeypatch, caplog):
    folder, model = reference

    def read_only(cache, key, compute):  # what the cache meets in a folder it cannot write
        compute()
        raise PermissionError(13, "Permission denied", str(cache))

    monkeypatch.setattr(D, "cached", read_only)
    ours = D.load(f"hf:{folder}", size=56, positions="transformers")
    assert "cannot cache the converted DINOv2" in caplog.text
    pixels = D.preprocess(_images()[:2], 56)
    np.testing.assert_allclose(ours.encoder.predict_on_batch({"images": pixels}),
                               _pooler(model, pixels), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Preprocessing (dgm-eval's transforms)


def test_dgm_eval_resize_equals_torchvision_as_dgm_eval_composes_it():
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("torchvision.transforms")
    transform = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize(D.IMAGENET_MEAN, D.IMAGENET_STD)])
    images = _images()
    theirs = torch.stack([transform(Image.fromarray(im).convert("RGB")) for im in images])
    np.testing.assert_allclose(D.preprocess(images), theirs.permute(0, 2, 3, 1).numpy(),
                               atol=1e-5)


def test_clean_resize_equals_dgm_evals_pil_resize():
    pytest.importorskip("torch")
    T = pytest.importorskip("torchvision.transforms")

    def pil_resize(image):  # dgm-eval's resizer.pil_resize, then its Normalize
        x = np.asarray(image.convert("RGB")).astype(np.float32)
        x = np.stack([np.asarray(Image.fromarray(x[:, :, c]).resize((224, 224), Image.BICUBIC))
                      .clip(0, 255) for c in range(3)], axis=2)
        return T.Normalize(D.IMAGENET_MEAN, D.IMAGENET_STD)(T.functional.to_tensor(x) / 255)

    images = _images()
    theirs = np.stack([pil_resize(Image.fromarray(im)).permute(1, 2, 0).numpy() for im in images])
    np.testing.assert_allclose(D.preprocess(images, resize="clean"), theirs, atol=1e-5)


def test_torch_fidelity_resize_equals_tensorflow1_bilinear():
    """torch-fidelity's resize is TensorFlow 1's bilinear, which it reproduces exactly."""
    tf = pytest.importorskip("tensorflow")
    images = _images()
    theirs = [tf.raw_ops.ResizeBilinear(images=im[None].astype(np.float32), size=[224, 224],
                                        align_corners=False, half_pixel_centers=False)[0].numpy()
              for im in images]
    theirs = (np.stack(theirs) - 255 * D.IMAGENET_MEAN) / (255 * D.IMAGENET_STD)
    np.testing.assert_allclose(D.preprocess(images, resize="torch-fidelity"), theirs, atol=1e-5)


def test_dgm_eval_resize_is_pils_bicubic_on_uint8():
    """The same check without torchvision (the JAX environment): its Resize on a PIL image is
    PIL's bicubic resize of the uint8 image."""
    image = _images()[-1]
    pil = np.asarray(Image.fromarray(image).resize((224, 224), Image.BICUBIC)) / 255.0
    np.testing.assert_allclose(D.preprocess(image)[0], (pil - D.IMAGENET_MEAN) / D.IMAGENET_STD,
                               atol=1e-5)


def test_resampling_keeps_the_trained_grid_and_constant_embeddings():
    pos = np.random.default_rng(0).normal(size=(1, 1 + 49, 4)).astype(np.float32)
    np.testing.assert_array_equal(D.interpolate_positions(pos, 7), pos)  # as both references
    flat = np.ones_like(pos)
    for positions in D.POSITIONS:  # the kernel's weights sum to 1 wherever it samples
        np.testing.assert_allclose(D.interpolate_positions(flat, 16, positions), 1.0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Bad folders and specs: each error names the folder and what is missing


def _config(folder, **fields):
    folder.mkdir(exist_ok=True)
    base = dict(model_type="dinov2", image_size=TRAINED, patch_size=14, hidden_size=32,
                num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, layerscale_value=1.0,
                use_swiglu_ffn=False, hidden_dropout_prob=0.0, drop_path_rate=0.0)
    (folder / "config.json").write_text(json.dumps({**base, **fields}))
    return folder


@pytest.mark.parametrize("fields, message", [
    ({"model_type": "clip"}, "model_type 'clip' is not a DINOv2"),
    ({"model_type": "dinov2_with_registers"}, "DINOv2 with registers"),
    ({"hidden_act": "silu"}, "hidden_act is 'silu'"),
    ({"layer_norm_eps": 1e-5}, "layer_norm_eps is 1e-05"),
])
def test_a_config_keras_hub_cannot_hold_is_refused_by_name(tmp_path, fields, message):
    folder = _config(tmp_path / "model", **fields)
    with pytest.raises(D.DinoV2Unavailable, match=message) as err:
        D.load(f"hf:{folder}")
    assert str(folder) in str(err.value)


def test_missing_files_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(D.DinoV2Unavailable, match="no config.json"):
        D.load(f"hf:{empty}")
    config = json.loads(_config(tmp_path / "short").joinpath("config.json").read_text())
    del config["mlp_ratio"]
    (tmp_path / "short" / "config.json").write_text(json.dumps(config))
    with pytest.raises(D.DinoV2Unavailable, match="no mlp_ratio"):
        D.load(f"hf:{tmp_path / 'short'}")
    torch_only = _config(tmp_path / "torch-only")
    (torch_only / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(D.DinoV2Unavailable, match=r"no model.safetensors .*pytorch_model.bin"):
        D.load(f"hf:{torch_only}")


def test_bad_specs_say_what_to_give(tmp_path, monkeypatch):
    with pytest.raises(D.DinoV2Unavailable, match="use hf:DIR"):
        D.load("local:/somewhere")
    with pytest.raises(D.DinoV2Unavailable, match="is not a folder"):
        D.load(f"hf:{tmp_path / 'a' / 'b' / 'c'}")

    def offline(repo, **kwargs):
        raise OSError("no connection")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(D.DinoV2Unavailable, match=r"facebook/dinov2-large cannot be fetched.*"
                                                  r"hf download facebook/dinov2-large"):
        D.load(D.DEFAULT)


def test_choices_are_checked():
    with pytest.raises(ValueError, match="resize 'bilinear'"):
        D.preprocess(_images()[:1], resize="bilinear")
    with pytest.raises(ValueError, match="positions 'timm'"):
        D.load(D.DEFAULT, positions="timm")
    with pytest.raises(ValueError, match="uint8 RGB"):
        D.preprocess(np.zeros((2, 8, 8, 3), np.float32))
