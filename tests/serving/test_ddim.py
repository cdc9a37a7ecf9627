"""The DDIM loop of fashion_sd.sd.ddim pinned to KerasCV's ``StableDiffusion.generate_image`` (the
reference, imported inside the tests that need it), to closed forms, and to its light imports."""

import contextlib
import io
import json
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
from tiny import tiny_unet

from fashion_sd.sd import ddim, models
from fashion_sd.serving.generate import Sampler

PROMPTS = ["an image of a 2011 Casual Fall White Men's Sweater", "an image of a Women's Dress"]
SEEDS = [0, 1]


class _Recorder:
    """A model whose ``predict_on_batch`` inputs are kept (the latents a decoder gets)."""

    def __init__(self, model):
        self.model, self.inputs = model, []

    def predict_on_batch(self, x):
        self.inputs.append(np.asarray(x))
        return self.model.predict_on_batch(x)


class _Zeros:
    """Text encoder, U-Net and decoder that answer zeros: enough to watch KerasCV walk its loop."""

    def predict_on_batch(self, inputs):
        if isinstance(inputs, dict) and "tokens" in inputs:
            return np.zeros((1, 77, 768), "float32")
        if isinstance(inputs, dict):
            return np.zeros_like(np.asarray(inputs["latent"]))
        return np.zeros(np.shape(inputs)[:3] + (3,), "float32")


def _kerascv(text_encoder, unet, decoder, tokenizer):
    """KerasCV's sampler on our models, as fashion-sd's Sampler set it up before ddim.py."""
    pytest.importorskip("keras_cv")
    from keras_cv.models import StableDiffusion

    with contextlib.redirect_stdout(io.StringIO()):  # its licence notice
        sd = StableDiffusion(img_height=128, img_width=128, jit_compile=False)
    sd._text_encoder, sd._diffusion_model, sd._decoder = text_encoder, unet, decoder
    sd._tokenizer = tokenizer
    return sd


@pytest.fixture(scope="module")
def sampler(small_parts):
    import keras

    keras.utils.set_random_seed(0)
    source = models.WeightsSource("random", "random", id="random-init(seed=0)")
    return Sampler(models.Components(source, 64, diffusion_model=tiny_unet(8), **small_parts))


@pytest.mark.parametrize("negative_prompt", [None, "blurry, low quality"])
@pytest.mark.parametrize("guidance", [1.0, 7.5])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_images_are_kerascvs_bit_for_bit(sampler, monkeypatch, steps, guidance, negative_prompt):
    comps = sampler.comps
    theirs = _Recorder(comps.decoder)
    sd = _kerascv(comps.text_encoder, comps.diffusion_model, theirs, comps.tokenizer)
    ours = _Recorder(comps.decoder)
    monkeypatch.setattr(sampler, "decoder", ours)
    monkeypatch.setattr(sampler, "rounding", "truncate")  # KerasCV's cut to uint8
    for prompt in PROMPTS:
        with contextlib.redirect_stdout(io.StringIO()):  # KerasCV's progress bar
            expected = sd.generate_image(
                sampler.encode(prompt), negative_prompt=negative_prompt, batch_size=len(SEEDS),
                num_steps=steps, unconditional_guidance_scale=guidance,
                diffusion_noise=sampler.initial_noise(SEEDS))
        got = sampler.generate(prompt, SEEDS, steps, guidance, negative_prompt)
        # Tolerance zero: the same float32 operations in the same order, latents and pixels.
        assert ours.inputs[-1].dtype == np.float32
        np.testing.assert_array_equal(ours.inputs[-1], theirs.inputs[-1])
        np.testing.assert_array_equal(got, expected)
        assert got.dtype == np.uint8 and got.shape == (2, 64, 64, 3)


def test_unconditional_tokens_are_kerascvs_empty_prompt(sampler):
    pytest.importorskip("keras_cv")
    from keras_cv.src.models.stable_diffusion.constants import _UNCONDITIONAL_TOKENS

    from fashion_sd.sd.tokenizer import END_TOKEN, tokenize

    tokens, _ = tokenize([""], sampler.comps.tokenizer)
    assert tokens[0].tolist() == list(_UNCONDITIONAL_TOKENS) == [49406] + [END_TOKEN] * 76


def test_long_negative_prompt_is_refused(sampler):
    with pytest.raises(ValueError, match="negative prompt too long: .* CLIP reads 77"):
        sampler.generate(PROMPTS[0], [0], steps=1, negative_prompt=" ".join(["blurry"] * 80))


@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 7, 10, 25, 27, 31, 50, 100, 1000])
def test_schedule_is_kerascvs(num_steps):
    recorded = {}
    sd = _kerascv(_Zeros(), _Zeros(), _Zeros(), None)
    initial_alphas, embedding = sd._get_initial_alphas, sd._get_timestep_embedding

    def alphas(steps):
        recorded["timesteps"] = np.asarray(steps).copy()
        recorded["alphas"] = initial_alphas(steps)
        return recorded["alphas"]

    def timestep_embedding(t, batch_size):
        recorded.setdefault("walked", []).append(int(t))
        return embedding(t, batch_size)

    sd._get_initial_alphas, sd._get_timestep_embedding = alphas, timestep_embedding
    with contextlib.redirect_stdout(io.StringIO()):
        sd.generate_image(np.zeros((1, 77, 768), "float32"), num_steps=num_steps,
                          diffusion_noise=np.zeros((1, 8, 8, 4), "float32"))
    ours = ddim.timesteps(num_steps)
    np.testing.assert_array_equal(ours, recorded["timesteps"])
    assert ours.dtype == np.int64 and recorded["walked"] == ours[::-1].tolist()
    assert ddim.alphas(ours) == recorded["alphas"]  # floats, exactly


@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 10, 27, 31, 50, 1000])
def test_schedule_closed_form(num_steps):
    ts = ddim.timesteps(num_steps)
    assert len(ts) == num_steps and ts[0] == 0
    if num_steps == 1:
        return
    assert ts[-1] == 999 and np.all(np.diff(ts) > 0)
    for i, t in enumerate(ts):
        exact = Fraction(999 * i, num_steps - 1)
        # numpy's half-to-even, except at exact halves the float product may fall either side
        assert t == round(exact) or (exact.denominator == 2 and abs(t - exact) == Fraction(1, 2))
    assert {3: [0, 500, 999], 4: [0, 333, 666, 999], 10: list(range(0, 1000, 111)),
            1000: list(range(1000))}.get(num_steps, ts.tolist()) == ts.tolist()
    if num_steps == 27:
        assert ts[13] == 499  # 13 * (999 / 26) = 499.49999999999994, not 499.5


def test_alphas_table_is_kerascvs():
    pytest.importorskip("keras_cv")
    from keras_cv.src.models.stable_diffusion.constants import _ALPHAS_CUMPROD

    assert ddim.sampler_alphas_cumprod() == tuple(_ALPHAS_CUMPROD)


def test_one_step_closed_form_and_float32_whatever_the_unet_dtype():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, 8, 8, 4)).astype("float32")
    eps_u, eps_c = (rng.standard_normal((2, 8, 8, 4)) for _ in range(2))
    contexts = (np.ones((1, 77, 8), "float32"), np.zeros((1, 77, 8), "float32"))

    def unet16(latent, t_emb, context):  # a float16 U-Net: conditional for the ones context
        return (eps_c if np.asarray(context).max() == 1 else eps_u).astype("float16")

    got = np.asarray(ddim.denoise(unet16, noise, contexts, steps=1, guidance=3.0))
    assert got.dtype == np.float32
    # one step: timestep 0 to the clean image, x0 = (x - sqrt(1 - a0) eps) / sqrt(a0)
    a0 = 1 - 0.00085
    u, c = (e.astype("float16").astype(np.float64) for e in (eps_u, eps_c))
    eps = u + 3.0 * (c - u)
    np.testing.assert_allclose(got, (noise - np.sqrt(1 - a0) * eps) / np.sqrt(a0), rtol=1e-5,
                               atol=1e-6)


def test_decode_truncates_as_kerascv():
    x = np.array([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0], "float32").reshape(1, 1, 6, 1)
    got = ddim.decode(lambda z: np.repeat(z, 3, axis=-1), x, rounding="truncate")
    assert got.dtype == np.uint8
    assert got[0, 0, :, 0].tolist() == [0, 0, 127, 254, 255, 255]  # 127.5 -> 127, 254.87 -> 254


def test_decode_rounds_as_diffusers():
    """The default is diffusers' own postprocessing (VaeImageProcessor to PIL), pixel for pixel,
    on decoder outputs beyond [-1, 1] and at every half level."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(0)
    x = rng.uniform(-1.2, 1.2, (2, 16, 16, 3)).astype("float32")
    x[0, 0, :, 0] = (np.arange(16) + 0.5) / 127.5 - 1  # (k + 0.5) / 255 after scaling
    got = ddim.decode(lambda z: z, x)
    pil = VaeImageProcessor().postprocess(torch.from_numpy(x).permute(0, 3, 1, 2), output_type="pil")
    np.testing.assert_array_equal(got, np.stack([np.asarray(im) for im in pil]))
    assert np.abs(got.astype(int) - ddim.decode(lambda z: z, x, "truncate")).max() == 1


_LIGHT = """
import json, sys
import numpy as np
from keras import ops
import fashion_sd.sd.ddim as ddim
unet = lambda x, t, c: 0.1 * ops.convert_to_tensor(x) + ops.mean(ops.convert_to_tensor(c))
noise = np.linspace(-1, 1, 2 * 8 * 8 * 4, dtype="float32").reshape(2, 8, 8, 4)
latents = ddim.denoise(unet, noise, (np.ones((1, 77, 4), "float32"), np.zeros((1, 77, 4), "float32")),
                       steps=3, guidance=7.5)
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"tensorflow", "keras_cv"})
print(json.dumps({"heavy": heavy, "latents": np.asarray(ops.convert_to_numpy(latents)).tolist()}))
"""


def test_importing_ddim_leaves_tensorflow_and_kerascv_out(root):
    import importlib.util

    backend = next((b for b in ("jax", "torch") if importlib.util.find_spec(b)), None)
    if backend is None:
        pytest.skip("neither jax nor torch installed: no Keras backend without TensorFlow")
    env = {**os.environ, "KERAS_BACKEND": backend}
    r = subprocess.run([sys.executable, "-c", _LIGHT], capture_output=True, text=True, env=env,
                       cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    # the same loop on this process's backend, to float32 rounding
    from keras import ops

    noise = np.linspace(-1, 1, 2 * 8 * 8 * 4, dtype="float32").reshape(2, 8, 8, 4)
    here = ddim.denoise(lambda x, t, c: 0.1 * ops.convert_to_tensor(x) + ops.mean(c), noise,
                        (np.ones((1, 77, 4), "float32"), np.zeros((1, 77, 4), "float32")), 3, 7.5)
    np.testing.assert_allclose(out["latents"], ops.convert_to_numpy(here), rtol=1e-6, atol=1e-6)
