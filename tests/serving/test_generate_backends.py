"""A LoRA generates the same images from the same seed on TensorFlow and on JAX: the networks,
the sampling loop and the starting noise (NumPy's Philox, :func:`fashion_sd.sd.ddim.starting_noise`)
are the same on both."""

import json

import numpy as np
from backends import run_on_jax
from conftest import ROOT
from generate_case import make_case, run_case

from fashion_sd.sd import ddim


def test_starting_noise_is_a_function_of_the_seed_alone():
    a = ddim.starting_noise([5, 6], (8, 8, 4))
    assert a.shape == (2, 8, 8, 4) and a.dtype == np.float32
    np.testing.assert_array_equal(a[1], ddim.starting_noise([6], (8, 8, 4))[0])  # batch-free
    assert not np.array_equal(a[0], a[1])
    many = ddim.starting_noise(range(200), (16, 16, 4))
    assert abs(many.mean()) < 0.01 and abs(many.std() - 1) < 0.01


def test_lora_images_equal_on_jax_and_tensorflow(tmp_path, small_parts):
    parts = {k: small_parts[k] for k in ("text_encoder", "decoder")}
    make_case(tmp_path, parts)
    want = run_case(tmp_path)
    run_on_jax(ROOT / "tests" / "generate_case.py", tmp_path)
    assert json.loads((tmp_path / "jax.json").read_text()) == {
        "tensorflow": False, "keras_cv": False, "torch": False}
    got = np.load(tmp_path / "jax.images.npz")["images"]
    assert got.shape == want.shape == (2, 64, 64, 3)
    # uint8 after rounding: float32 rounding may move a value across a grey level
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99
    assert not np.array_equal(want[0], want[1])
