"""Seconds per LoRA training step and peak memory: cached encoders vs encoders every step.

    python benchmarks/train_step.py [--resolutions 64 256] [--batch 1] [--steps 3]

"cached" is this trainer: the text encoder and VAE ran once beforehand, a step runs only the
U-Net. "uncached" runs the frozen text encoder and VAE encoder inside every step, as the paper's
code (keras-io's fine-tuning example) does. Each configuration runs in its own process, so the
peak resident memory printed is its own. Random-init weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(resolution: int, cached: bool, batch: int, steps: int) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from fashion_sd import data, diffusion, hardware, lora, models
    from fashion_sd.trainer import LoraTrainer, make_optimizer

    keras.utils.set_random_seed(0)
    source = models.WeightsSource("random", "random", id="random-init(seed=0)")
    comps = models.build_components(source, resolution)
    layers = lora.apply_lora(comps.diffusion_model, 4, 8.0, ["to_q", "to_k", "to_v", "out_proj"])
    rng = np.random.default_rng(0)
    h = resolution // 8
    noise = dict(vae_eps=rng.standard_normal((batch, h, h, 4)).astype("float32"),
                 noise=rng.standard_normal((batch, h, h, 4)).astype("float32"),
                 timesteps=rng.integers(0, 1000, batch).astype("int32"))
    jit = hardware.resolve_jit("auto")

    if cached:
        batch_data = dict(moments=rng.standard_normal((batch, h, h, 8)).astype("float32"),
                          context=rng.standard_normal((batch, 77, 768)).astype("float32"), **noise)
        trainer = LoraTrainer(comps.diffusion_model)
    else:
        moments_model = data.vae_moments_model(comps.image_encoder)
        text_encoder = comps.text_encoder

        class EncodeEveryStep(LoraTrainer):
            def call(self, batch, training=False):
                positions = tf.range(77)[None]
                context = text_encoder([batch["tokens"], tf.repeat(positions, tf.shape(batch["tokens"])[0], 0)],
                                       training=False)
                moments = moments_model(batch["images"], training=False)
                return super().call({**batch, "moments": moments, "context": context}, training)

        tokens, _ = data.tokenize(["an image of a 2011 Casual Fall White Men's Sweater"] * batch,
                                  comps.tokenizer)
        batch_data = dict(images=rng.uniform(-1, 1, (batch, resolution, resolution, 3)).astype("float32"),
                          tokens=tokens, **noise)
        trainer = EncodeEveryStep(comps.diffusion_model)
    trainer.compile(optimizer=make_optimizer(1e-4, 1000, 0, 0.01, 1.0, 1, "float32"), jit_compile=jit)
    ds = tf.data.Dataset.from_tensors(batch_data).repeat()
    it = iter(ds)
    t0 = time.perf_counter()
    trainer.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)  # trace + first step
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
    per_step = (time.perf_counter() - t0) / steps
    del it
    return {"resolution": resolution, "cached": cached, "batch": batch, "seconds_per_step": per_step,
            "first_call_seconds": first, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "xla": jit, "trainable": lora.lora_parameter_count(layers, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # "res,cached": run one configuration
    args = ap.parse_args()
    if args.one:
        res, cached = args.one.split(",")
        print(json.dumps(measure(int(res), cached == "1", args.batch, args.steps)))
        return
    from benchmarks._machine import describe

    print(f"machine: {describe()}")
    print(f"batch {args.batch}, {args.steps} timed steps after one traced step, float32")
    results = {}
    for res in args.resolutions:
        for cached in (True, False):
            out = subprocess.run([sys.executable, __file__, "--one", f"{res},{int(cached)}",
                                  "--batch", str(args.batch), "--steps", str(args.steps)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-2000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[(res, cached)] = r
            print(f"{res:>4} px {'cached  ' if cached else 'uncached'}: {r['seconds_per_step']:.2f} s/step, "
                  f"first call {r['first_call_seconds']:.0f} s, peak RSS {r['peak_rss_gb']:.1f} GB",
                  flush=True)
        c, u = results[(res, True)], results[(res, False)]
        print(f"{res:>4} px ratio uncached/cached: {u['seconds_per_step'] / c['seconds_per_step']:.2f}x time, "
              f"{u['peak_rss_gb'] / c['peak_rss_gb']:.2f}x peak memory", flush=True)


if __name__ == "__main__":
    main()
