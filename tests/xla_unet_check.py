"""Run by test_compiled_unet.py in its own process (the fused attention against KerasCV's, then XLA) (XLA compiling the real U-Net's backward pass
on the CPU peaks near 12 GB; a fresh process early in the suite leaves room for it): one LoRA step
(plain SGD, so the update is the gradient) on the real U-Net at 64 px without and with XLA.
Prints key=value lines."""

import gc

import keras
import numpy as np
import tensorflow as tf

from fashion_sd.config import LoraConfig
from fashion_sd.sd import attention, lora, models
from fashion_sd.training import trainer as tr

TARGETS = ["to_q", "to_k", "to_v", "out_proj"]

keras.utils.set_random_seed(0)
model = models.build_component("diffusion_model", 64)  # built with the fused attention

# The fused attention against KerasCV's own, same weights, float32.
rng = np.random.default_rng(2)
x = [rng.standard_normal((2, 8, 8, 4)).astype("float32"),
     rng.standard_normal((2, 320)).astype("float32"),
     rng.standard_normal((2, 77, 768)).astype("float32")]
fused = np.asarray(model(x))
swapped = attention.set_attention(model, "kerascv")
ref = np.asarray(model(x))
attention.set_attention(model, "fused")
print(f"attention_layers={swapped}")
print(f"fused_rel={float(np.abs(fused - ref).max() / np.abs(ref).max())}")
layers = lora.apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
rng = np.random.default_rng(3)
for layer in layers.values():  # B != 0, so A gets gradients too
    layer.lora_kernel_b.assign(rng.standard_normal(layer.lora_kernel_b.shape).astype("float32") * 0.01)
start = lora.lora_state(layers)
batch = {"moments": rng.standard_normal((1, 8, 8, 8)).astype("float32"),
         "context": rng.standard_normal((1, 77, 768)).astype("float32"),
         "vae_eps": rng.standard_normal((1, 8, 8, 4)).astype("float32"),
         "noise": rng.standard_normal((1, 8, 8, 4)).astype("float32"),
         "timesteps": np.array([300], "int32")}
results = {}
for jit in (False, True):
    for key, layer in layers.items():
        layer.lora_kernel_a.assign(start[f"{key}.lora_a"])
        layer.lora_kernel_b.assign(start[f"{key}.lora_b"])
    trainer = tr.LoraTrainer(model)
    trainer.compile(optimizer=keras.optimizers.SGD(1.0), jit_compile=jit)
    h = trainer.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0)
    after = lora.lora_state(layers)
    results[jit] = (h.history["loss"][0], bool(trainer.jit_compile),
                    np.concatenate([(after[k] - start[k]).ravel() for k in sorted(start)]))
    del trainer
    gc.collect()
(loss0, jit0, d0), (loss1, jit1, d1) = results[False], results[True]
print(f"jit={jit0},{jit1}")
print(f"loss={loss0},{loss1}")
print(f"max_update={float(np.abs(d0).max())}")
print(f"max_update_diff={float(np.abs(d1 - d0).max())}")
