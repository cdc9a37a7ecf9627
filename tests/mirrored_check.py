"""Run by test_trainer.py in its own process: the same training on one device and mirrored over
two logical CPU devices (global batch 4 split 2 + 2), with clipping on, in float32 and in
mixed_float16 (the loss-scale optimizer inside the cross-replica skip). Prints key=value lines."""

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "training"))
from test_trainer import batches, make, optimizer, snapshot  # noqa: E402


def run(strategy, precision="float32"):
    keras.mixed_precision.set_dtype_policy(precision)
    with strategy.scope():
        t, layers = make(clip=0.05, precision=precision)  # small enough to clip: global norm
        if strategy.num_replicas_in_sync > 1:
            t.compile(optimizer=optimizer(clip=0.05, precision=precision, replicas=2),
                      jit_compile=False)
            t.optimizer.build(t.trainable_variables)
    h = t.fit(batches(n=8, batch=4, nan_rows=[5]), epochs=2, verbose=0, shuffle=False)
    keras.mixed_precision.set_dtype_policy("float32")
    return h.history["loss"][-1], snapshot(layers), int(t.skipped_steps.numpy()), t


loss1, s1, skip1, _ = run(tf.distribute.get_strategy())
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
loss2, s2, skip2, _ = run(mirrored)
print(f"replicas={mirrored.num_replicas_in_sync}")
print(f"loss_single={loss1}")
print(f"loss_mirrored={loss2}")
print(f"skipped={skip1},{skip2}")
print(f"max_lora_diff={max(float(np.abs(s1[k] - s2[k]).max()) for k in s1)}")
h1, f1, fskip1, t1 = run(tf.distribute.get_strategy(), "mixed_float16")
h2, f2, fskip2, t2 = run(mirrored, "mixed_float16")
print(f"fp16_skipped={fskip1},{fskip2}")
print(f"fp16_scale={float(t1.optimizer.dynamic_scale.numpy())},{float(t2.optimizer.dynamic_scale.numpy())}")
print(f"fp16_loss={h1},{h2}")
print(f"fp16_max_lora_diff={max(float(np.abs(f1[k] - f2[k]).max()) for k in f1)}")
