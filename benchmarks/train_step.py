"""Seconds per LoRA training step and peak memory, one axis at a time against a baseline, and a
diffusers + PEFT step beside ours.

    python benchmarks/train_step.py [--resolutions 64 256] [--batch 1] [--steps 8]
        [--precision float32] [--attention fused] [--lora separate] [--encoders]
        [--variants all|none] [--no-diffusers]

The baseline is the given ``--precision``, ``--attention`` and ``--lora`` form with cached
encoders; each other configuration changes one of them: float32 <-> mixed_bfloat16, fused
(``keras.ops.dot_product_attention``) <-> KerasCV's attention, a separate LoRA branch <-> Keras'
merged ``enable_lora`` kernel, both of those at once (from the default baseline: how the
trainer computed a step before the fused attention and the LoRA branch), and with ``--encoders`` the frozen text encoder and VAE run inside
every step (the paper's code, keras-io's fine-tuning example) instead of once beforehand.

``diffusers+PEFT``: the same step as diffusers' ``train_text_to_image_lora.py`` takes it, on
diffusers' ``UNet2DConditionModel`` with SD 1.4's config (random init), PEFT's LoRA on the same
attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0``: the same 797,184 parameters
at rank 4, checked), at the same rank, alpha, batch, resolution and precision (bf16 through
``torch.autocast``); noise prediction, MSE, backward, global-norm clipping, AdamW.

Every configuration runs ``--steps`` + 1 steps inside one ``fit`` (one loop for torch): the
first (tracing, compiling, allocating) is reported apart, the rest timed per step by a callback
(wall time between the ends of consecutive steps, the loss read back so the step has finished)
and reported as their median. Each configuration runs in its own process, so the peak resident
memory printed is its own. Random-init weights: speed does not depend on them. XLA as
``train.jit_compile: auto`` picks.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RANK, ALPHA, LR = 4, 8.0, 1e-4


def _summary(times: list[float], first: float) -> dict:
    """``times``: seconds of the timed steps; their median is the figure."""
    return {"seconds_per_step": statistics.median(times), "step_seconds": times,
            "first_call_seconds": first,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def measure(resolution: int, cached: bool, batch: int, steps: int, precision: str = "float32",
            attention: str = "fused", lora_form: str = "separate") -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from fashion_sd.config import LoraConfig, TrainConfig
    from fashion_sd.sd import lora, models, tokenizer
    from fashion_sd.sd.attention import set_attention
    from fashion_sd.training import data, hardware
    from fashion_sd.training.trainer import LoraTrainer, make_optimizer

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_dtype_policy(precision)
    source = models.WeightsSource("random", "random", id="random-init(seed=0)")
    which = ("diffusion_model",) if cached else ("diffusion_model", "text_encoder", "image_encoder")
    comps = models.build_components(source, resolution, which)
    set_attention(comps.diffusion_model, attention)
    layers = lora.apply_lora(comps.diffusion_model, LoraConfig(rank=RANK, alpha=ALPHA, form=lora_form))
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

        tokens, _ = tokenizer.tokenize(["an image of a 2011 Casual Fall White Men's Sweater"] * batch,
                                  comps.tokenizer)
        batch_data = dict(images=rng.uniform(-1, 1, (batch, resolution, resolution, 3)).astype("float32"),
                          tokens=tokens, **noise)
        trainer = EncodeEveryStep(comps.diffusion_model)
    trainer.compile(optimizer=make_optimizer(TrainConfig(learning_rate=LR), 1000, precision),
                    jit_compile=jit)

    class StepTimes(keras.callbacks.Callback):
        """Wall time at the end of each step, after reading its loss back (so it has run)."""

        def on_train_begin(self, logs=None):
            self.ends = [time.perf_counter()]

        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])
            self.ends.append(time.perf_counter())

    ds = tf.data.Dataset.from_tensors(batch_data).repeat()
    timer = StepTimes()
    trainer.fit(ds, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[timer])
    durations = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    return {"resolution": resolution, "cached": cached, "batch": batch, "precision": precision,
            "attention": attention, "lora": lora_form, **_summary(durations[1:], durations[0]),
            "xla": jit, "trainable": lora.lora_parameter_count(layers, RANK)}


def sd14_unet(sample_size: int):
    """diffusers' U-Net with Stable Diffusion v1.4's config (v1-inference.yaml), random init."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, cross_attention_dim=768,
        attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def measure_diffusers(resolution: int, batch: int, steps: int, precision: str = "float32") -> dict:
    """One step of diffusers' train_text_to_image_lora.py (cached latents and encodings)."""
    import contextlib

    import torch
    from diffusers import DDPMScheduler
    from peft import LoraConfig as PeftLoraConfig

    torch.manual_seed(0)
    h = resolution // 8
    unet = sd14_unet(h)
    unet.requires_grad_(False)
    unet.add_adapter(PeftLoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=True,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=1e-2)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 4, h, h, generator=g) * 0.18215
    context = torch.randn(batch, 77, 768, generator=g)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "mixed_bfloat16"
                else contextlib.nullcontext())
    ends = [time.perf_counter()]
    for _ in range(steps + 1):
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        noisy = sched.add_noise(latents, noise, t)
        with autocast:
            pred = unet(noisy, t, context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise, reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        float(loss)
        ends.append(time.perf_counter())
    durations = [b - a for a, b in zip(ends, ends[1:])]
    return {"resolution": resolution, "batch": batch, "precision": precision,
            **_summary(durations[1:], durations[0]), "trainable": trainable,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def label(cfg: dict) -> str:
    if cfg.get("diffusers"):
        return f"{cfg['precision']:<14} diffusers+PEFT (torch)"
    return (f"{cfg['precision']:<14} {cfg['attention']:<7} LoRA {cfg['lora']:<8} "
            f"{'cached' if cfg['cached'] else 'uncached'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8, help="timed steps after the first")
    ap.add_argument("--precision", default="float32", choices=["float32", "mixed_bfloat16"])
    ap.add_argument("--attention", default="fused", choices=["fused", "kerascv"])
    ap.add_argument("--lora", default="separate", choices=["separate", "merged"])
    ap.add_argument("--encoders", action="store_true",
                    help="also time the encoders run in every step (the paper's code)")
    ap.add_argument("--variants", default="all", choices=["all", "none"],
                    help="none: only the baseline (and diffusers+PEFT)")
    ap.add_argument("--no-diffusers", action="store_true", help="leave out the diffusers+PEFT step")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a JSON configuration: run only that
    args = ap.parse_args()
    if args.one:
        cfg = json.loads(args.one)
        if cfg.get("diffusers"):
            out = measure_diffusers(cfg["resolution"], args.batch, args.steps, cfg["precision"])
        else:
            out = measure(cfg["resolution"], cfg["cached"], args.batch, args.steps,
                          cfg["precision"], cfg["attention"], cfg["lora"])
        print(json.dumps(out))
        return
    from benchmarks._machine import describe

    base = {"precision": args.precision, "attention": args.attention, "lora": args.lora,
            "cached": True}
    other = {"precision": {"float32": "mixed_bfloat16", "mixed_bfloat16": "float32"},
             "attention": {"fused": "kerascv", "kerascv": "fused"},
             "lora": {"separate": "merged", "merged": "separate"}}
    variants = []
    if args.variants == "all":
        variants = [{**base, axis: other[axis][base[axis]]} for axis in other]
        # both attention and LoRA form swapped: from the default baseline, how main trained before
        variants.append({**base, "attention": other["attention"][base["attention"]],
                         "lora": other["lora"][base["lora"]]})
        if args.encoders:
            variants.append({**base, "cached": False})
    if not args.no_diffusers:
        variants.append({"diffusers": True, "precision": args.precision})
    print(f"machine: {describe()}")
    print(f"batch {args.batch}, LoRA rank {RANK}, alpha {ALPHA:g}; per configuration one fit of "
          f"{args.steps + 1} steps: the first apart, the median of the other {args.steps}; "
          f"baseline: {label(base)}")
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
            spread = f"{min(r['step_seconds']):.2f}-{max(r['step_seconds']):.2f}"
            print(f"{res:>4} px {label(cfg)}: {r['seconds_per_step']:.2f} s/step (median; "
                  f"{spread}), first step {r['first_call_seconds']:.0f} s, peak RSS "
                  f"{r['peak_rss_gb']:.1f} GB" + (f", torch {r['torch']} on {r['threads']} threads"
                                                  if cfg.get("diffusers") else ""), flush=True)
            if cfg.get("diffusers") and r["trainable"] != results[0]["trainable"]:
                sys.exit(f"diffusers+PEFT trains {r['trainable']:,} LoRA parameters, ours "
                         f"{results[0]['trainable']:,}: not the same projections")
        b = results[0]
        for cfg, r in zip(variants, results[1:]):
            print(f"{res:>4} px ratio {label(cfg)} / baseline: "
                  f"{r['seconds_per_step'] / b['seconds_per_step']:.2f}x time, "
                  f"{r['peak_rss_gb'] / b['peak_rss_gb']:.2f}x peak memory", flush=True)


if __name__ == "__main__":
    main()
