"""The training step on a tiny denoiser: skipping, precision, accumulation, state, replicas."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT
from tiny import tiny_unet

from fashion_sd.config import LoraConfig, TrainConfig
from fashion_sd.sd import lora
from fashion_sd.training import trainer as tr

TARGETS = ["to_q", "to_k", "to_v", "out_proj"]


def batches(n=8, batch=4, seed=0, nan_rows=()):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n, 8, 8, 8)).astype("float32")
    m[list(nan_rows)] = np.nan
    d = dict(moments=m, context=rng.standard_normal((n, 77, 768)).astype("float32"),
             vae_eps=rng.standard_normal((n, 8, 8, 4)).astype("float32"),
             noise=rng.standard_normal((n, 8, 8, 4)).astype("float32"),
             timesteps=rng.integers(0, 1000, n).astype("int32"))
    return tf.data.Dataset.from_tensor_slices(d).batch(batch)


def optimizer(clip=1.0, grad_accum=1, precision="float32", total_steps=100, replicas=1):
    train = TrainConfig(learning_rate=1e-3, warmup_steps=0, weight_decay=0.01, grad_clip=clip,
                        grad_accum=grad_accum)
    return tr.make_optimizer(train, total_steps, precision, replicas)


def make(precision="float32", grad_accum=1, clip=1.0, seed=0, total_steps=100):
    keras.utils.set_random_seed(seed)
    unet = tiny_unet()
    layers = lora.apply_lora(unet, LoraConfig(rank=2, alpha=4.0, targets=TARGETS))
    for layer in layers.values():  # start away from B = 0 so every step moves A too
        layer.lora_kernel_b.assign(np.full(layer.lora_kernel_b.shape, 0.01, "float32"))
    t = tr.LoraTrainer(unet)
    t.compile(optimizer=optimizer(clip=clip, grad_accum=grad_accum, precision=precision,
                                  total_steps=total_steps),
              jit_compile=False)
    t.optimizer.build(t.trainable_variables)
    return t, layers


def snapshot(layers):
    return {k: v.copy() for k, v in lora.lora_state(layers).items()}


def test_loss_goes_down_on_a_fixed_batch():
    t, _ = make()
    h = t.fit(batches(n=4).repeat(), epochs=3, steps_per_epoch=10, verbose=0, shuffle=False)
    assert h.history["loss"][-1] < h.history["loss"][0]


def test_nonfinite_step_is_skipped_and_counted():
    t, layers = make()
    before = snapshot(layers)
    iterations = int(t.optimizer.iterations.numpy())
    t.fit(batches(n=4, nan_rows=[1]), epochs=1, verbose=0, shuffle=False)
    after = snapshot(layers)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # no update, no decay
    assert int(t.optimizer.iterations.numpy()) == iterations
    assert int(t.skipped_steps.numpy()) == 1 and int(t.nonfinite_streak.numpy()) == 1
    t.fit(batches(n=4), epochs=1, verbose=0, shuffle=False)  # a good step ends the streak
    assert int(t.skipped_steps.numpy()) == 1 and int(t.nonfinite_streak.numpy()) == 0
    assert not all(np.array_equal(after[k], v) for k, v in snapshot(layers).items())


def test_mixed_float16_keeps_lora_in_float32():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        t, layers = make(precision="mixed_float16")
        assert isinstance(t.optimizer, keras.optimizers.LossScaleOptimizer)
        assert {v.dtype for v in t.trainable_variables} == {"float32"}
        h = t.fit(batches(), epochs=1, verbose=0, shuffle=False)
        assert np.isfinite(h.history["loss"][0])
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_gradient_accumulation_equals_a_larger_batch():
    # Clipping off: accumulation clips the averaged gradient, so compare without it.
    # A long schedule: Keras evaluates it at micro-step 1 instead of 0, which must not matter.
    big, lb = make(clip=None, total_steps=10**7)
    big.fit(batches(n=4, batch=4), epochs=1, verbose=0, shuffle=False)
    acc, la = make(grad_accum=2, clip=None, total_steps=10**7)
    acc.fit(batches(n=4, batch=2), epochs=1, verbose=0, shuffle=False)
    sb, sa = snapshot(lb), snapshot(la)
    for k in sb:
        # Adam divides by |g| + 1e-7: for a gradient element near 1e-7 float rounding moves
        # that element's update (1e-3 at this learning rate) by up to a few 1e-7
        np.testing.assert_allclose(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    assert int(acc.optimizer.iterations.numpy()) == 1


def test_train_state_round_trip(tmp_path):
    t, layers = make()
    t.fit(batches(), epochs=2, verbose=0, shuffle=False)
    path = tr.save_train_state(tmp_path / "state.safetensors", t, layers, {"step": 4})
    t2, layers2 = make()  # same base weights, as in a resumed run; fresh LoRA and optimizer
    assert not all(np.array_equal(a.numpy(), b.numpy())
                   for a, b in zip(t.optimizer.variables, t2.optimizer.variables))
    info = tr.load_train_state(path, t2, layers2)
    assert info == {"step": 4}
    for a, b in zip(t.optimizer.variables, t2.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    s1, s2 = snapshot(layers), snapshot(layers2)
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    # both continue identically
    t.fit(batches(seed=3), epochs=1, verbose=0, shuffle=False)
    t2.fit(batches(seed=3), epochs=1, verbose=0, shuffle=False)
    s1, s2 = snapshot(layers), snapshot(layers2)
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    t3, layers3 = make(grad_accum=2)
    with pytest.raises(ValueError, match="optimizer has .* variables"):
        tr.load_train_state(path, t3, layers3)


def test_mirrored_strategy_matches_one_device():
    # Logical devices must be set before TensorFlow starts, so this runs in its own process.
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "mirrored_check.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert int(result["replicas"]) == 2
    assert float(result["max_lora_diff"]) < 1e-5
    assert abs(float(result["loss_single"]) - float(result["loss_mirrored"])) < 1e-5
    # mixed_float16: the loss-scale optimizer inside the cross-replica skip. Non-finite losses
    # are skipped alike and leave the scale alone; float16 rounds the two batch splits apart,
    # and Adam's normalised steps (lr 1e-3) turn that into differences below one step.
    assert result["fp16_skipped"] == "2,2" and result["fp16_scale"] == "32768.0,32768.0"
    single, mirrored = map(float, result["fp16_loss"].split(","))
    assert abs(single - mirrored) < 1e-3 * abs(single)
    assert float(result["fp16_max_lora_diff"]) < 1e-3


class HugeGradient(tr.LoraTrainer):
    """A loss whose gradient is ``value`` in every element of the first LoRA matrix, 0 elsewhere:
    finite, but its squared global norm overflows float32 from about 1.8e19."""

    value = 3e19

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        first, *rest = self.trainable_variables
        loss = keras.ops.sum(first) * self.value + self.value * 0.0 * keras.ops.sum(x["noise"])
        return loss + sum(keras.ops.sum(v) * 0.0 for v in rest)


def huge(precision="float32"):
    keras.utils.set_random_seed(0)
    unet = tiny_unet()
    layers = lora.apply_lora(unet, LoraConfig(rank=2, alpha=4.0, targets=TARGETS))
    t = HugeGradient(unet)
    t.compile(optimizer=optimizer(clip=1.0, precision=precision), jit_compile=False)
    t.optimizer.build(t.trainable_variables)
    return t, layers


def test_keras_clipping_turns_a_finite_huge_gradient_into_nan():
    # The issue's reproduction, on Keras' own optimizer: why the step checks the norm itself.
    v = keras.Variable(np.zeros(4, "float32"))
    opt = keras.optimizers.AdamW(learning_rate=1e-3, global_clipnorm=1.0)
    opt.apply([np.full(4, 3e19, "float32")], [v])
    assert np.isnan(v.numpy()).all()


@pytest.mark.parametrize("precision", ["float32", "mixed_float16"])
def test_gradient_whose_norm_overflows_is_skipped_and_counted(precision):
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        t, layers = huge(precision)
        before = snapshot(layers)
        opt_before = [v.numpy().copy() for v in t.optimizer.variables]
        t.fit(batches(n=4), epochs=1, verbose=0, shuffle=False)
        after = snapshot(layers)
        assert all(np.array_equal(before[k], after[k]) for k in before)  # weights unchanged
        for a, v in zip(opt_before, t.optimizer.variables):  # no moments, no iteration, no scale change
            np.testing.assert_array_equal(a, v.numpy())
        assert int(t.skipped_steps.numpy()) == 1 and int(t.nonfinite_streak.numpy()) == 1
        assert int(t.overflow_steps.numpy()) == 0  # not a float16 overflow: the scale stays
        t.value = 1e3  # a gradient clipping can handle: applied, finite, streak over
        t.make_train_function(force=True)
        t.fit(batches(n=4), epochs=1, verbose=0, shuffle=False)
        state = snapshot(layers)
        assert all(np.isfinite(v).all() for v in state.values())
        assert not all(np.array_equal(after[k], state[k]) for k in state)
        assert int(t.skipped_steps.numpy()) == 1 and int(t.nonfinite_streak.numpy()) == 0
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
