"""fashion_sd.sd.attention without TensorFlow: checked and timed under Keras' JAX backend.

    KERAS_BACKEND=jax python benchmarks/attention_jax.py [--blocks 4] [--batch 3] [--tokens 4096]

Needs only keras and jax (no TensorFlow, no keras_cv): it is what runs on a GPU machine that
has JAX but no TensorFlow. A stack of SD v1.4 transformer attention pairs at the 512 px U-Net's
widest level (4096 latent tokens, 320 channels, 8 heads of 40; cross-attention over 77 x 768
CLIP tokens), each attention layer built like KerasCV's ``CrossAttention`` (the reference below
repeats its arithmetic: reshape, two dots, softmax). It prints, in one run:

1. float32 correctness: fused attention vs the reference, the LoRA branch vs the merged kernel
   (outputs and A/B gradients), as max error over max value;
2. one LoRA training step (forward + backward to A and B, jit-compiled, bfloat16 compute) for
   {KerasCV, fused} attention x {merged, separate} LoRA: milliseconds, peak device memory,
   and each ratio to KerasCV + merged (Keras' enable_lora), the way the project used to train.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from fashion_sd.sd import attention  # noqa: E402


class ReferenceAttention(keras.layers.Layer):
    """KerasCV's CrossAttention arithmetic (keras_cv 0.9.0), for machines without keras_cv."""

    def __init__(self, num_heads, head_size, **kwargs):
        super().__init__(**kwargs)
        self.to_q = keras.layers.Dense(num_heads * head_size, use_bias=False)
        self.to_k = keras.layers.Dense(num_heads * head_size, use_bias=False)
        self.to_v = keras.layers.Dense(num_heads * head_size, use_bias=False)
        self.out_proj = keras.layers.Dense(num_heads * head_size)
        self.num_heads, self.head_size, self.scale = num_heads, head_size, head_size**-0.5

    def call(self, inputs, context=None):
        context = inputs if context is None else context
        q, k, v = self.to_q(inputs), self.to_k(context), self.to_v(context)
        n, h = self.num_heads, self.head_size
        q = ops.transpose(ops.reshape(q, (-1, inputs.shape[1], n, h)), (0, 2, 1, 3))
        k = ops.transpose(ops.reshape(k, (-1, context.shape[1], n, h)), (0, 2, 3, 1))
        v = ops.transpose(ops.reshape(v, (-1, context.shape[1], n, h)), (0, 2, 1, 3))
        weights = keras.activations.softmax(ops.matmul(q, k) * self.scale)
        out = ops.transpose(ops.matmul(weights, v), (0, 2, 1, 3))
        return self.out_proj(ops.reshape(out, (-1, inputs.shape[1], n * h)))


def build(blocks: int, tokens: int, mode: str, form: str, rank: int = 4):
    keras.utils.set_random_seed(0)
    x_in = keras.Input((tokens, 320))
    c_in = keras.Input((77, 768))
    x = x_in
    layers = []
    for _ in range(blocks):
        self_attn, cross_attn = ReferenceAttention(8, 40), ReferenceAttention(8, 40)
        x = x + self_attn(x)
        x = x + cross_attn(x, c_in)
        layers += [self_attn, cross_attn]
    model = keras.Model([x_in, c_in], x)
    for v in model.trainable_weights:
        v.trainable = False
    for layer in layers:
        attention.use_attention(layer, mode)
        for dense in (layer.to_q, layer.to_k, layer.to_v, layer.out_proj):
            dense.enable_lora(rank, lora_alpha=8.0)
            attention.use_lora_form(dense, form)
            # B != 0 so that every path carries signal
            dense.lora_kernel_b.assign(np.random.default_rng(1).standard_normal(
                dense.lora_kernel_b.shape).astype("float32") * 0.01)
    return model


def step_fn(model):
    import jax
    import jax.numpy as jnp

    def loss(trainable, non_trainable, x, c):
        y, _ = model.stateless_call(trainable, non_trainable, [x, c])
        return jnp.mean(jnp.square(y.astype("float32")))

    return jax.jit(jax.value_and_grad(loss))


def values(model):
    return ([v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables])


def inputs(batch, tokens):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch, tokens, 320)).astype("float32"),
            rng.standard_normal((batch, 77, 768)).astype("float32"))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def check_float32(blocks, batch, tokens):
    import jax

    # Full float32 matmuls: on GPUs JAX's default lets float32 products run in TF32 (10-bit
    # mantissa), which alone differs by about 1e-3 between any two orders of summation.
    with jax.default_matmul_precision("highest"):
        _check_float32(blocks, batch, tokens)


def _check_float32(blocks, batch, tokens):
    x, c = inputs(batch, tokens)
    ref_model = build(blocks, tokens, "kerascv", "merged")
    ref = np.asarray(ref_model([x, c]))
    _, g_ref = step_fn(ref_model)(*values(ref_model), x, c)
    fused_model = build(blocks, tokens, "fused", "separate")
    out = np.asarray(fused_model([x, c]))
    _, g = step_fn(fused_model)(*values(fused_model), x, c)
    print(f"float32: fused attention + LoRA branch vs KerasCV attention + merged kernel: "
          f"output {rel(out, ref):.2e}, A/B gradients "
          f"{max(rel(a, b) for a, b in zip(g, g_ref)):.2e} (max error / max value)")


def time_step(blocks, batch, tokens, mode, form, repeats=20):
    import jax

    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = build(blocks, tokens, mode, form)
        fn = step_fn(model)
        tv, ntv = values(model)
        x, c = (jax.device_put(a) for a in inputs(batch, tokens))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(tv, ntv, x, c))
        compile_s = time.perf_counter() - t0
        for _ in range(3):
            jax.block_until_ready(fn(tv, ntv, x, c))
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = fn(tv, ntv, x, c)
        jax.block_until_ready(out)
        ms = (time.perf_counter() - t0) / repeats * 1e3
        stats = jax.devices()[0].memory_stats() or {}
        return ms, compile_s, stats.get("peak_bytes_in_use", 0) / 2**30
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


CONFIGS = (("kerascv", "merged"), ("fused", "merged"), ("kerascv", "separate"),
           ("fused", "separate"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # "mode,form": time one, in this process
    args = ap.parse_args()
    import json
    import subprocess

    import jax

    if args.one:  # its own process, so the peak device memory is its own
        ms, compile_s, peak = time_step(args.blocks, args.batch, args.tokens, *args.one.split(","))
        print(json.dumps({"ms": ms, "compile_s": compile_s, "peak_gib": peak}))
        return
    assert "tensorflow" not in sys.modules and "keras_cv" not in sys.modules
    print(f"keras {keras.__version__} on {keras.backend.backend()} (jax {jax.__version__}), "
          f"device {jax.devices()[0].device_kind}; tensorflow imported: no")
    print(f"{args.blocks} self+cross attention pairs, batch {args.batch}, {args.tokens} tokens")
    check_float32(args.blocks, 1, min(args.tokens, 1024))
    base = None
    for mode, form in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--one", f"{mode},{form}", "--blocks",
                              str(args.blocks), "--batch", str(args.batch), "--tokens",
                              str(args.tokens)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        base = base or r["ms"]
        print(f"bf16 step, {mode:<7} attention, LoRA {form:<8}: {r['ms']:7.2f} ms "
              f"(compile {r['compile_s']:.0f} s), peak device memory {r['peak_gib']:.2f} GiB, "
              f"{base / r['ms']:.2f}x the speed of kerascv + merged", flush=True)


if __name__ == "__main__":
    main()
