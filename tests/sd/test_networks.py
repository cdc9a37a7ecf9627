"""The project's SD 1.x networks (fashion_sd.sd.unet, text_encoder, vae) equal KerasCV's.

KerasCV 0.9 is the reference: the same random weights, written in the legacy .h5 layout of
KerasCV's published files (matched by layer order) and as Keras 3 .weights.h5 (matched by class
and attribute names), load into ours; the outputs then agree in float32 to 1e-5 of their range.
The U-Net is real-size at 64 px, so that part is marked slow.
"""

import json
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest
from conftest import ROOT

from fashion_sd.sd import attention, text_encoder, unet, vae


def legacy_h5(model, path):
    """``model``'s weights in the layout of KerasCV's published .h5 files (Keras 2's format)."""
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return str(path)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def loaded_pair(ours_cls, ref, tmp_path, fmt, *args):
    """Ours, with the weights of KerasCV's ``ref`` read from a file of format ``fmt``."""
    if fmt == "legacy":
        path = legacy_h5(ref, tmp_path / "ref.h5")
    else:
        path = str(tmp_path / "ref.weights.h5")
        ref.save_weights(path)
    ours = ours_cls(*args)
    ours.load_weights(path)
    return ours


@pytest.mark.parametrize("fmt", ["legacy", "keras3"])
def test_text_encoder_equals_kerascvs(tmp_path, fmt):
    from keras_cv.models.stable_diffusion import TextEncoder

    keras.utils.set_random_seed(1)
    ref = TextEncoder(77, download_weights=False)
    ours = loaded_pair(text_encoder.TextEncoder, ref, tmp_path, fmt, 77)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 49408, (2, 77)).astype("int32")
    tokens[1, 9:] = 49407  # a caption padded with the end token, as training feeds them
    positions = np.repeat(np.arange(77, dtype="int32")[None], 2, 0)
    want = np.asarray(ref([tokens, positions]))
    got = np.asarray(ours([tokens, positions]))
    assert rel(got, want) <= 1e-5
    # causal: a token's output does not depend on the tokens after it
    later = tokens.copy()
    later[:, 40:] = 320
    np.testing.assert_array_equal(np.asarray(ours([later, positions]))[:, :40], got[:, :40])
    assert not np.allclose(np.asarray(ours([later, positions]))[:, 40:], got[:, 40:])


@pytest.mark.parametrize("fmt", ["legacy", "keras3"])
def test_vae_equals_kerascvs(tmp_path, fmt):
    from keras_cv.models.stable_diffusion import Decoder, ImageEncoder

    keras.utils.set_random_seed(2)
    rng = np.random.default_rng(0)
    ref = ImageEncoder(download_weights=False)
    ours = loaded_pair(vae.ImageEncoder, ref, tmp_path, fmt)
    images = rng.uniform(-1, 1, (2, 64, 48, 3)).astype("float32")  # any size, not square
    assert rel(ours(images), ref(images)) <= 1e-5
    # the 8 posterior moments training samples from are the second-to-last layer's, as KerasCV's
    moments = keras.Model(ours.inputs, ours.layers[-2].output)(images)
    assert moments.shape == (2, 8, 6, 8)
    np.testing.assert_allclose(np.asarray(moments)[..., :4] * vae.LATENT_SCALE,
                               np.asarray(ours(images)), rtol=1e-6)

    ref = Decoder(64, 48, download_weights=False)
    ours = loaded_pair(vae.Decoder, ref, tmp_path, fmt, 64, 48)
    latents = rng.standard_normal((2, 8, 6, 4)).astype("float32")
    assert rel(ours(latents), ref(latents)) <= 1e-5


def test_attention_modes_agree_and_keep_the_weights():
    keras.utils.set_random_seed(3)
    layer = unet.CrossAttention(8, 40)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64, 320)).astype("float32")
    ctx = rng.standard_normal((2, 77, 768)).astype("float32")
    fused = np.asarray(layer(x, context=ctx))
    paths = [w.path for w in layer.weights]
    attention.use_attention(layer, "kerascv")
    explicit = np.asarray(layer(x, context=ctx))
    assert [w.path for w in layer.weights] == paths
    assert rel(fused, explicit) <= 1e-5
    with pytest.raises(ValueError, match="model.attention"):
        attention.use_attention(layer, "flash")


def test_networks_import_neither_tensorflow_nor_keras_cv():
    # torch is the backend this environment has besides TensorFlow (the JAX one has its own tests)
    code = ("import sys; import fashion_sd.sd.unet, fashion_sd.sd.text_encoder, fashion_sd.sd.vae; "
            "bad = [m for m in ('tensorflow', 'keras_cv') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"KERAS_BACKEND": "torch", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_real_size_unet_equals_kerascvs(tmp_path):
    """860M parameters at 64 px, both attention modes, from KerasCV's legacy file layout."""
    from keras_cv.models.stable_diffusion import DiffusionModel

    keras.utils.set_random_seed(4)
    ref = DiffusionModel(64, 64, 77, download_weights=False)
    path = legacy_h5(ref, tmp_path / "unet.h5")
    rng = np.random.default_rng(0)
    x = [rng.standard_normal((2, 8, 8, 4)).astype("float32"),
         rng.standard_normal((2, 320)).astype("float32"),
         rng.standard_normal((2, 77, 768)).astype("float32")]
    want = np.asarray(ref(x))
    del ref
    ours = unet.DiffusionModel(64, 64, 77)
    ours.load_weights(path)
    assert rel(ours(x), want) <= 1e-5
    assert attention.set_attention(ours, "kerascv") == 32
    assert rel(ours(x), want) <= 1e-5


# --------------------------------------------------------------------------------------------
# The same networks on Keras' JAX backend, in an environment without TensorFlow


def same_on_jax(tmp_path, models_by_name: dict, inputs_by_name: dict, resolution: int) -> dict:
    """Each model's outputs on JAX from its weights here, after checking JAX ran without TF."""
    from backends import modules, run_on_jax

    for name, model in models_by_name.items():
        model.save_weights(str(tmp_path / f"{name}.weights.h5"))
        np.savez(tmp_path / f"{name}.inputs.npz",
                 **{f"x{i}": x for i, x in enumerate(inputs_by_name[name])})
    (tmp_path / "job.json").write_text(json.dumps(
        {"components": list(models_by_name), "resolution": resolution}))
    run_on_jax(ROOT / "tests" / "on_backend.py", tmp_path)
    assert modules(tmp_path) == {"backend": "jax", "tensorflow": False, "keras_cv": False,
                                 "torch": False}
    return {name: np.load(tmp_path / f"{name}.outputs.npz")["out"] for name in models_by_name}


def test_text_encoder_and_vae_equal_on_jax_and_tensorflow(tmp_path, small_parts):
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 49408, (2, 77)).astype("int32")
    inputs = {"text_encoder": [tokens, np.repeat(np.arange(77, dtype="int32")[None], 2, 0)],
              "image_encoder": [rng.uniform(-1, 1, (2, 64, 64, 3)).astype("float32")],
              "decoder": [rng.standard_normal((2, 8, 8, 4)).astype("float32")]}
    got = same_on_jax(tmp_path, small_parts, inputs, 64)
    for name, model in small_parts.items():
        x = inputs[name]
        want = np.asarray(model(x if len(x) > 1 else x[0], training=False))
        assert rel(got[name], want) <= 1e-5, name


@pytest.mark.slow
def test_real_size_unet_equals_on_jax_and_tensorflow(tmp_path):
    keras.utils.set_random_seed(6)
    model = unet.DiffusionModel(64, 64, 77)
    rng = np.random.default_rng(1)
    x = [rng.standard_normal((2, 8, 8, 4)).astype("float32"),
         rng.standard_normal((2, 320)).astype("float32"),
         rng.standard_normal((2, 77, 768)).astype("float32")]
    want = np.asarray(model(x))
    got = same_on_jax(tmp_path, {"diffusion_model": model}, {"diffusion_model": x}, 64)
    assert rel(got["diffusion_model"], want) <= 1e-5
