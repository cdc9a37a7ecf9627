"""Training throughput on 1 and 2 replicas, and the scaling efficiency.

    python benchmarks/scaling.py [--batch 8] [--steps 20] [--latent 32]

The LoRA trainer (``fashion_sd.training.trainer.LoraTrainer``, the tiny test U-Net with LoRA, global batch
``--batch``) fitted on one device and mirrored over two devices (``tf.distribute.
MirroredStrategy``, the global batch split in two). On a machine without GPUs the two devices
are logical CPU devices sharing the same cores, so the figure here measures the strategy's
overhead, not a speed-up; on a two-GPU box it is the real scaling. Efficiency is
images/s(2 replicas) / (2 x images/s(1 replica)), so 0.5 is the most two logical devices on the
same cores can show. Measured on the 2-core AMD EPYC CPU machine (256 px latents, global batch 8):
68.4 images/s on one replica, 59.2 on two, efficiency 0.43.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="global batch")
    ap.add_argument("--steps", type=int, default=20, help="timed steps after 3 warm-up steps")
    ap.add_argument("--latent", type=int, default=32, help="latent side (32: 256 px images)")
    args = ap.parse_args()

    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) < 2:  # before TensorFlow starts: two logical CPU devices
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        devices = ["/cpu:0", "/cpu:1"]
    else:
        devices = ["/gpu:0", "/gpu:1"]
    import keras
    import numpy as np
    from tiny import tiny_unet

    from benchmarks._machine import describe
    from fashion_sd.config import LoraConfig, TrainConfig
    from fashion_sd.sd import lora
    from fashion_sd.training import trainer as tr

    print(f"machine: {describe()}; replicas over {', '.join(devices)}")
    n = args.batch * (args.steps + 3)
    rng = np.random.default_rng(0)
    s = args.latent
    data = dict(moments=rng.standard_normal((n, s, s, 8)).astype("float32"),
                context=rng.standard_normal((n, 77, 768)).astype("float32"),
                vae_eps=rng.standard_normal((n, s, s, 4)).astype("float32"),
                noise=rng.standard_normal((n, s, s, 4)).astype("float32"),
                timesteps=rng.integers(0, 1000, n).astype("int32"))

    def throughput(strategy) -> float:
        replicas = strategy.num_replicas_in_sync
        with strategy.scope():
            keras.utils.set_random_seed(0)
            unet = tiny_unet(s)
            lora.apply_lora(unet, LoraConfig(rank=4, alpha=4.0))
            t = tr.LoraTrainer(unet)
            t.compile(optimizer=tr.make_optimizer(TrainConfig(learning_rate=1e-4), 1000,
                                                  "float32", replicas), jit_compile=False)
            t.optimizer.build(t.trainable_variables)
        ds = tf.data.Dataset.from_tensor_slices(data).batch(args.batch)
        t.fit(ds.take(3), verbose=0, shuffle=False)  # warm-up: tracing and the first steps
        t0 = time.perf_counter()
        t.fit(ds.skip(3), verbose=0, shuffle=False)
        return args.steps * args.batch / (time.perf_counter() - t0)

    one = throughput(tf.distribute.get_strategy())
    two = throughput(tf.distribute.MirroredStrategy(devices))
    for name, ips in (("1 replica", one), ("2 replicas", two)):
        print(f"{name:>10}: {ips / args.batch:6.2f} steps/s, {ips:7.1f} images/s "
              f"(global batch {args.batch})")
    print(f"scaling efficiency: {two / (2 * one):.2f} (images/s with 2 replicas / 2x one replica)")


if __name__ == "__main__":
    main()
