"""Run by test_trainer.py in its own process: the same training on one device and mirrored over
two logical CPU devices (global batch 4 split 2 + 2), with clipping on. Prints key=value lines."""

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import numpy as np  # noqa: E402
from test_trainer import batches, make, snapshot  # noqa: E402


def run(strategy):
    with strategy.scope():
        t, layers = make(clip=0.05)  # small enough to clip: checks the global-norm handling
        if strategy.num_replicas_in_sync > 1:
            from fashion_sd import trainer as tr

            t.compile(optimizer=tr.make_optimizer(1e-3, 100, 0, 0.01, 0.05, 1, "float32", 2),
                      jit_compile=False)
            t.optimizer.build(t.trainable_variables)
    h = t.fit(batches(n=8, batch=4, nan_rows=[5]), epochs=2, verbose=0, shuffle=False)
    return h.history["loss"][-1], snapshot(layers), int(t.skipped_steps.numpy())


loss1, s1, skip1 = run(tf.distribute.get_strategy())
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
loss2, s2, skip2 = run(mirrored)
print(f"replicas={mirrored.num_replicas_in_sync}")
print(f"loss_single={loss1}")
print(f"loss_mirrored={loss2}")
print(f"skipped={skip1},{skip2}")
print(f"max_lora_diff={max(float(np.abs(s1[k] - s2[k]).max()) for k in s1)}")
