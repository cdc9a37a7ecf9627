"""Seconds per LoRA training step and peak memory, one axis at a time against a baseline.

    python benchmarks/train_step.py [--resolutions 64 256] [--batch 1] [--steps 3]
        [--precision float32] [--attention fused] [--lora separate] [--encoders]

The baseline is the given ``--precision``, ``--attention`` and ``--lora`` form with cached
encoders; each other configuration changes one of them: float32 <-> mixed_bfloat16, fused
(``keras.ops.dot_product_attention``) <-> KerasCV's attention, a separate LoRA branch <-> Keras'
merged ``enable_lora`` kernel, both of those at once (from the default baseline: how the
trainer computed a step before the fused attention and the LoRA branch), and with ``--encoders`` the frozen text encoder and VAE run inside
every step (the paper's code, keras-io's fine-tuning example) instead of once beforehand.
Each configuration runs in its own process, so the peak resident memory printed is its own.
Random-init weights: speed does not depend on them. XLA as ``train.jit_compile: auto`` picks.
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


def measure(resolution: int, cached: bool, batch: int, steps: int, precision: str = "float32",
            attention: str = "fused", lora_form: str = "separate") -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from fashion_sd import data, hardware, lora, models
    from fashion_sd.attention import set_attention
    from fashion_sd.config import LoraConfig, TrainConfig
    from fashion_sd.trainer import LoraTrainer, make_optimizer

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_dtype_policy(precision)
    source = models.WeightsSource("random", "random", id="random-init(seed=0)")
    which = ("diffusion_model",) if cached else ("diffusion_model", "text_encoder", "image_encoder")
    comps = models.build_components(source, resolution, which)
    set_attention(comps.diffusion_model, attention)
    layers = lora.apply_lora(comps.diffusion_model, LoraConfig(rank=4, alpha=8.0, form=lora_form))
    rng = np.random.default_rng(0)
    h = resolution // 8
    noise = dict(vae_eps=rng.standard_normal((batch, h, h, 4)).astype("float32"),
                 noise=rng.standard_normal((batch, h, h, 4)).astype("float32"),
                 timesteps=rng.integers(0, 1000, batch).astype("int32"))
    jit = hardware.resolve_jit("auto")[0]

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
    trainer.compile(optimizer=make_optimizer(TrainConfig(learning_rate=1e-4), 1000, precision),
                    jit_compile=jit)
    ds = tf.data.Dataset.from_tensors(batch_data).repeat()
    it = iter(ds)
    t0 = time.perf_counter()
    trainer.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)  # trace + first step
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0)
    per_step = (time.perf_counter() - t0) / steps
    del it
    return {"resolution": resolution, "cached": cached, "batch": batch, "precision": precision,
            "attention": attention, "lora": lora_form, "seconds_per_step": per_step,
            "first_call_seconds": first, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "xla": jit, "trainable": lora.lora_parameter_count(layers, 4)}


def label(cfg: dict) -> str:
    return (f"{cfg['precision']:<14} {cfg['attention']:<7} LoRA {cfg['lora']:<8} "
            f"{'cached' if cfg['cached'] else 'uncached'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", default="float32", choices=["float32", "mixed_bfloat16"])
    ap.add_argument("--attention", default="fused", choices=["fused", "kerascv"])
    ap.add_argument("--lora", default="separate", choices=["separate", "merged"])
    ap.add_argument("--encoders", action="store_true",
                    help="also time the encoders run in every step (the paper's code)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a JSON configuration: run only that
    args = ap.parse_args()
    if args.one:
        cfg = json.loads(args.one)
        print(json.dumps(measure(cfg["resolution"], cfg["cached"], args.batch, args.steps,
                                 cfg["precision"], cfg["attention"], cfg["lora"])))
        return
    from benchmarks._machine import describe

    base = {"precision": args.precision, "attention": args.attention, "lora": args.lora,
            "cached": True}
    other = {"precision": {"float32": "mixed_bfloat16", "mixed_bfloat16": "float32"},
             "attention": {"fused": "kerascv", "kerascv": "fused"},
             "lora": {"separate": "merged", "merged": "separate"}}
    variants = [{**base, axis: other[axis][base[axis]]} for axis in other]
    # both attention and LoRA form swapped: from the default baseline, how main trained before
    variants.append({**base, "attention": other["attention"][base["attention"]],
                     "lora": other["lora"][base["lora"]]})
    if args.encoders:
        variants.append({**base, "cached": False})
    print(f"machine: {describe()}")
    print(f"batch {args.batch}, {args.steps} timed steps after one traced step; baseline: "
          f"{label(base)}")
    for res in args.resolutions:
        results = []
        for cfg in [base, *variants]:
            out = subprocess.run([sys.executable, __file__, "--one", json.dumps({**cfg, "resolution": res}),
                                  "--batch", str(args.batch), "--steps", str(args.steps)],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-2000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{res:>4} px {label(cfg)}: {r['seconds_per_step']:.2f} s/step, first call "
                  f"{r['first_call_seconds']:.0f} s, peak RSS {r['peak_rss_gb']:.1f} GB", flush=True)
        b = results[0]
        for cfg, r in zip(variants, results[1:]):
            print(f"{res:>4} px ratio {label(cfg)} / baseline: "
                  f"{r['seconds_per_step'] / b['seconds_per_step']:.2f}x time, "
                  f"{r['peak_rss_gb'] / b['peak_rss_gb']:.2f}x peak memory", flush=True)


if __name__ == "__main__":
    main()
