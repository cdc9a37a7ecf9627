"""Mixed precision, XLA and the LoRA branch, proven on the CPU (TF runs bf16 here via oneDNN).

Tolerances: "float32 precision" is rtol 1e-6 / atol 1e-6 on unit-scale values; the LoRA branch
and the merged kernel sum the same products in another order, so they agree to rtol 1e-5.
"""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_trainer import TARGETS, batches, make, optimizer, snapshot
from tiny import tiny_unet

from fashion_sd.config import LoraConfig
from fashion_sd.sd import attention, lora
from fashion_sd.training import callbacks as cb
from fashion_sd.sd import diffusion
from fashion_sd.training import trainer as tr

TIMESTEPS = [0, 1, 15, 500, 999]


@contextlib.contextmanager
def policy(name):
    keras.mixed_precision.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


class Recorder(keras.layers.Layer):
    """Stands in for the U-Net: remembers the latent it is given, predicts zeros."""

    def __init__(self):
        super().__init__(dtype="float32")
        self.seen = []

    def call(self, inputs, training=False):
        if tf.executing_eagerly():  # Keras also traces it symbolically to build the trainer
            self.seen.append(keras.ops.convert_to_numpy(inputs[0]))
        return inputs[0] * 0.0


def fixed_batch():
    rng = np.random.default_rng(0)
    n = len(TIMESTEPS)
    return {"moments": rng.standard_normal((n, 8, 8, 8)).astype("float32"),
            "context": rng.standard_normal((n, 77, 768)).astype("float32"),
            "vae_eps": rng.standard_normal((n, 8, 8, 4)).astype("float32"),
            "noise": rng.standard_normal((n, 8, 8, 4)).astype("float32"),
            "timesteps": np.array(TIMESTEPS, "int32")}


def reference_noised(batch):
    """x_t and x_0 in float64 from the closed forms (Ho et al. eq. 4; the VAE posterior)."""
    abar = diffusion.alphas_cumprod()[batch["timesteps"]].reshape(-1, 1, 1, 1)
    m = batch["moments"].astype(np.float64)
    mean, logvar = m[..., :4], np.clip(m[..., 4:], -30, 20)
    x0 = (mean + np.exp(0.5 * logvar) * batch["vae_eps"]) * diffusion.LATENT_SCALE
    return np.sqrt(abar) * x0 + np.sqrt(1 - abar) * batch["noise"], x0


def test_bf16_noising_and_target_are_float32():
    # On main before this change the trainer's inputs were cast to bf16 and alpha-bar with them:
    # at t = 0 and 1 x_t had (almost) no noise. This test failed there.
    batch = fixed_batch()
    with policy("mixed_bfloat16"):
        unet = Recorder()
        trainer = tr.LoraTrainer(unet)
        out = trainer(batch)
    noisy = unet.seen[-1]
    assert noisy.dtype == np.float32
    expected, x0 = reference_noised(batch)
    np.testing.assert_allclose(noisy, expected, rtol=1e-6, atol=1e-6)
    target = keras.ops.convert_to_numpy(out["target"])
    assert target.dtype == np.float32
    np.testing.assert_array_equal(target, batch["noise"])
    # the noise part of x_t at t = 0 and 1 (0.029 and 0.041 of the noise) is there, to 1e-3
    abar = diffusion.alphas_cumprod()[:2].reshape(-1, 1, 1, 1)
    noise_part = noisy[:2] - np.sqrt(abar) * x0[:2]
    np.testing.assert_allclose(noise_part, np.sqrt(1 - abar) * batch["noise"][:2], rtol=1e-3,
                               atol=1e-5)


def lora_dense(seed=0):
    keras.utils.set_random_seed(seed)
    dense = keras.layers.Dense(48, use_bias=True)
    dense.build((None, 32))
    dense.enable_lora(4, lora_alpha=8.0)
    rng = np.random.default_rng(seed)
    dense.lora_kernel_b.assign(rng.standard_normal((4, 48)).astype("float32") * 0.1)
    dense.bias.assign(rng.standard_normal(48).astype("float32"))
    return dense


def output_and_grads(dense, x):
    with tf.GradientTape() as tape:
        y = dense(x)
        loss = tf.reduce_sum(tf.sin(y))
    ga, gb = tape.gradient(loss, [dense.lora_kernel_a, dense.lora_kernel_b])
    return y.numpy(), ga.numpy(), gb.numpy()


def test_lora_branch_equals_merged_kernel_float32():
    dense = lora_dense()
    x = np.random.default_rng(1).standard_normal((3, 7, 32)).astype("float32")
    attention.use_lora_form(dense, "merged")  # Keras' enable_lora computation
    y_m, ga_m, gb_m = output_and_grads(dense, x)
    attention.use_lora_form(dense, "separate")
    y_s, ga_s, gb_s = output_and_grads(dense, x)
    np.testing.assert_allclose(y_s, y_m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ga_s, ga_m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gb_s, gb_m, rtol=1e-5, atol=1e-5)
    # and against the closed form x W + b + s (x A) B in float64
    w, a, b = (v.numpy().astype(np.float64) for v in
               (dense._kernel, dense.lora_kernel_a, dense.lora_kernel_b))
    expected = x @ w + dense.bias.numpy() + 2.0 * (x @ a) @ b
    np.testing.assert_allclose(y_s, expected, rtol=1e-5, atol=1e-5)


def test_separate_branch_needs_no_kernel_gradient():
    # The frozen kernel is read as a constant: autodiff never forms x^T dy for it.
    dense = lora_dense()
    x = np.ones((2, 32), "float32")

    def kernel_sized_matmuls(form):
        attention.use_lora_form(dense, form)

        @tf.function  # a new one per form: a traced function would keep the first form
        def grads():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(dense(x))
            return tape.gradient(loss, [dense.lora_kernel_a, dense.lora_kernel_b])

        # The ops the returned gradients depend on: TF also emits the unused gradient of W
        # (x^T dy) for the branch, but nothing needs it and Grappler / XLA prune it.
        graph = grads.get_concrete_function().graph
        needed, todo = set(), [t.op for t in graph.outputs]
        while todo:
            op = todo.pop()
            if op.name not in needed:
                needed.add(op.name)
                todo.extend(i.op for i in op.inputs)
        return sum(tuple(op.outputs[0].shape) == (32, 48) for op in graph.get_operations()
                   if op.type in ("MatMul", "BatchMatMulV2") and op.name in needed)

    assert kernel_sized_matmuls("merged") >= 1  # x^T dy and A @ B: the full weight gradient
    assert kernel_sized_matmuls("separate") == 0


def test_lora_form_needs_enabled_lora():
    dense = keras.layers.Dense(4)
    dense.build((None, 3))
    with pytest.raises(ValueError, match="enable LoRA"):
        attention.use_lora_form(dense)
    with pytest.raises(ValueError, match="use one of"):
        attention.use_lora_form(lora_dense(), "fast")


def lora_grads(trainer, layers, data):
    with tf.GradientTape() as tape:
        loss = trainer._loss(data, training=True)
    variables = [v for layer in layers.values() for v in (layer.lora_kernel_a, layer.lora_kernel_b)]
    return [g.numpy().ravel() for g in tape.gradient(loss, variables)]


def test_bf16_lora_gradients_agree_with_float32():
    data = next(iter(batches(n=4, batch=4)))
    t32, l32 = make()  # B = 0.01 everywhere: A gets gradients too
    g32 = lora_grads(t32, l32, data)
    with policy("mixed_bfloat16"):
        t16, l16 = make()
        assert {v.dtype for v in t16.trainable_variables} == {"float32"}
        g16 = lora_grads(t16, l16, data)
    cos = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) for a, b in zip(g32, g16)]
    assert min(cos) > 0.99, cos


def fp16_trainer(**kw):
    t, layers = make(precision="mixed_float16", **kw)
    assert isinstance(t.optimizer, keras.optimizers.LossScaleOptimizer)
    return t, layers


def guarded_fit(t, data, tmp_path, steps, max_nonfinite=3, min_loss_scale=1.0):
    state = cb.RunState(tmp_path, steps, 1, steps, steps)
    t.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False,
          callbacks=[cb.StepGuard(state, max_nonfinite, min_loss_scale)])
    return state


def test_fp16_overflow_lowers_the_scale_and_does_not_stop_the_run(tmp_path):
    with policy("mixed_float16"):
        t, layers = fp16_trainer()
        before = snapshot(layers)
        # A scale no float16 gradient survives: every step overflows until it has come down.
        t.optimizer.dynamic_scale.assign(2.0**26)
        state = guarded_fit(t, batches(n=4, batch=1).repeat(), tmp_path, steps=12, max_nonfinite=2)
    assert state.stop_reason is None and state.step == 12
    overflows = int(t.overflow_steps.numpy())
    assert overflows >= 3  # more than max_nonfinite, and the run went on
    assert int(t.skipped_steps.numpy()) == 0 and int(t.nonfinite_streak.numpy()) == 0
    assert tr.loss_scale(t.optimizer) < 2.0**26
    assert not all(np.array_equal(before[k], v) for k, v in snapshot(layers).items())  # trained


def test_fp16_nonfinite_unscaled_losses_stop_the_run(tmp_path):
    with policy("mixed_float16"):
        t, _ = fp16_trainer()
        scale = tr.loss_scale(t.optimizer)
        state = guarded_fit(t, batches(n=4, batch=1, nan_rows=[0, 1, 2, 3]).repeat(), tmp_path,
                            steps=10, max_nonfinite=3)
    assert state.stop_reason == "nonfinite" and state.step == 3
    assert int(t.skipped_steps.numpy()) == 3 and int(t.overflow_steps.numpy()) == 0
    assert tr.loss_scale(t.optimizer) == scale  # not an overflow: the scale is left alone


def test_fp16_loss_scale_floor_stops_the_run(tmp_path):
    with policy("mixed_float16"):
        t, _ = fp16_trainer()
        t.optimizer.dynamic_scale.assign(2.0**40)
        state = guarded_fit(t, batches(n=4, batch=1).repeat(), tmp_path, steps=10,
                            min_loss_scale=2.0**38)
    # 2^40 -> 2^39 -> 2^38 -> 2^37, which is below the floor: the third step stops the run
    assert state.stop_reason == "loss_scale" and state.step == 3
    assert tr.loss_scale(t.optimizer) == 2.0**37 and int(t.overflow_steps.numpy()) == 3


def test_xla_training_equals_non_xla():
    data = batches(n=8, batch=4, seed=5)
    runs = {}
    for jit in (False, True):
        t, layers = make()
        t.compile(optimizer=optimizer(),
                  jit_compile=jit)
        t.optimizer.build(t.trainable_variables)
        h = t.fit(data, epochs=2, verbose=0, shuffle=False)
        assert bool(t.jit_compile) is jit
        runs[jit] = h.history["loss"], snapshot(layers)
    (loss0, s0), (loss1, s1) = runs[False], runs[True]
    np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
    for k in s0:  # 4 Adam steps of 1e-3: XLA's fused arithmetic moves them by < 1e-6
        np.testing.assert_allclose(s1[k], s0[k], rtol=1e-5, atol=1e-6)


def test_fused_attention_equals_kerascv_on_the_tiny_model():
    keras.utils.set_random_seed(3)
    model = tiny_unet()
    rng = np.random.default_rng(0)
    x = [rng.standard_normal((2, 8, 8, 4)).astype("float32"),
         rng.standard_normal((2, 320)).astype("float32"),
         rng.standard_normal((2, 77, 768)).astype("float32")]
    assert attention.set_attention(model, "kerascv") == 4  # 2 transformers x (self, cross)
    ref = np.asarray(model(x))
    attention.set_attention(model, "fused")
    fused = np.asarray(model(x))
    np.testing.assert_allclose(fused, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    weights = [w.path for w in model.weights]
    # LoRA on top of the fused attention
    layers = lora.apply_lora(model, LoraConfig(rank=2, alpha=4.0, targets=TARGETS))
    # the swap changed no variable, name or order (weights files and interop see the same model)
    assert len(layers) == 16 and [w.path for w in model.weights if "lora" not in w.path] == weights


def test_warmup_and_cosine_count_optimizer_steps():
    lr, total, warm = 1e-3, 10, 4
    s1 = tr.WarmupCosine(lr, total, warm)
    s2 = tr.WarmupCosine(lr, total, warm, grad_accum=2)
    for k in range(total + 2):
        expected = (lr * (k + 1) / warm if k < warm
                    else 0.5 * lr * (1 + np.cos(np.pi * min(1.0, (k - warm) / (total - warm)))))
        assert float(s1(k)) == pytest.approx(expected, rel=1e-6, abs=1e-12)
        # with accumulation, micro-batches 2k and 2k + 1 belong to optimizer step k
        assert float(s2(2 * k)) == float(s2(2 * k + 1)) == pytest.approx(float(s1(k)))
    assert float(s1(0)) > 0  # the first warm-up step trains
    assert float(tr.WarmupCosine(lr, total)(0)) == pytest.approx(lr)


def test_attention_module_imports_only_keras(root):
    # It must run where there is no TensorFlow (Keras' JAX backend on the GPU machine).
    import ast
    import sys

    tree = ast.parse((root / "fashion_sd" / "sd" / "attention.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert imported - set(sys.stdlib_module_names) == {"keras"}, imported


def test_sampler_loop_gets_float32_from_a_bf16_unet():
    # The U-Net computes in bfloat16; the guidance and the DDIM update run in float32.
    from fashion_sd.sd import ddim

    with policy("mixed_bfloat16"):
        keras.utils.set_random_seed(0)
        unet = tiny_unet()
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((1, 8, 8, 4)).astype("float32")
    contexts = tuple(rng.standard_normal((1, 77, 768)).astype("float32") for _ in range(2))
    outputs, steps = [], []

    def predict(latent, t_emb, context):
        out = unet.predict_on_batch({"latent": latent, "timestep_embedding": t_emb,
                                     "context": context})
        outputs.append(np.asarray(out).dtype)
        return out

    got = ddim.denoise(predict, noise, contexts, steps=3, on_step=lambda *a: steps.append(a))
    assert np.dtype("float32") not in set(outputs)  # what the loop was handed
    assert np.asarray(got).dtype == np.float32 and steps == [(1, 3), (2, 3), (3, 3)]


def test_the_masked_loss_trains_under_float16_loss_scaling_as_in_float32():
    """One step with train.mask_background_weight=0 under mixed_float16's loss scaling moves the
    LoRA as the float32 step does, and not as the unmasked step does."""
    rng = np.random.default_rng(7)
    plain = next(iter(batches(n=4, batch=4)))
    masked = {**plain, "mask": tf.constant((rng.random((4, 8, 8, 1)) > 0.5).astype("float32"))}

    def step(precision, data, background):
        with policy(precision):
            t, layers = make(precision=precision)
            t.mask_background = background
            before = snapshot(layers)
            t.fit(tf.data.Dataset.from_tensors(data), epochs=1, steps_per_epoch=1, verbose=0)
            return np.concatenate([(v - before[k]).ravel() for k, v in snapshot(layers).items()])

    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    f32, f16 = step("float32", masked, 0.0), step("mixed_float16", masked, 0.0)
    unmasked = step("float32", plain, None)
    assert cos(f32, f16) > 0.99 and cos(f32, unmasked) < cos(f32, f16)
