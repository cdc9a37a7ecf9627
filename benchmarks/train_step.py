"""Seconds per LoRA training step and peak memory, one axis at a time against a baseline, and a
diffusers + PEFT step beside ours.

    python benchmarks/train_step.py [--resolutions 64 256] [--batch 1] [--steps 8]
        [--precision float32] [--attention fused] [--lora separate] [--encoders]
        [--variants all|none] [--no-diffusers] [--backend tensorflow jax] [--torch-compile]

``--backend``: the Keras backends to time the baseline on, each in its own process under
``KERAS_BACKEND`` (the first is the baseline the variants change; ``jax`` runs with the Python of
``.venv-jax`` when the current one has no jax, or ``--jax-python``). On a GPU machine with JAX
and torch but no TensorFlow: ``--backend jax --variants none``. On a GPU each result also gives
images/s and the share of the card's bf16 dense peak at 512 px (1.777 TFLOP per image-step,
forward and backward with the base frozen, counted by torch's FlopCounter on SD 1.4's U-Net).

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


TFLOP_PER_IMAGE_STEP_512 = 1.777  # SD 1.4's U-Net, forward + backward, base frozen (FlopCounter)
# bf16 dense tensor-core peaks (TFLOP/s) from the vendors' datasheets, by the name nvidia-smi gives
BF16_PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H200": 989.4,
                    "A100-SXM4-80GB": 312.0, "A100-SXM4-40GB": 312.0, "L4": 121.0}


def _summary(times: list[float], first: float, batch: int, resolution: int,
             device_peak_gb: float | None = None) -> dict:
    """``times``: seconds of the timed steps; their median is the figure."""
    median = statistics.median(times)
    out = {"seconds_per_step": median, "step_seconds": times, "first_call_seconds": first,
           "images_per_second": batch / median,
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device_peak_gb is not None:
        out["device_peak_gb"] = device_peak_gb
    return out


def peak_share(result: dict, gpu: str) -> float | None:
    """The share of the card's bf16 peak a 512 px step reaches, or None where it means nothing."""
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in gpu), None)
    if peak is None or result.get("resolution") != 512:
        return None
    return result["images_per_second"] * TFLOP_PER_IMAGE_STEP_512 / peak


def _jax_peak_gb() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def measure(resolution: int, cached: bool, batch: int, steps: int, precision: str = "float32",
            attention: str = "fused", lora_form: str = "separate", lora_type: str = "lora") -> dict:
    import keras
    import numpy as np

    from fashion_sd.config import LoraConfig, TrainConfig
    from fashion_sd.sd import lora, models, tokenizer
    from fashion_sd.sd.attention import set_attention
    from fashion_sd.training.trainer import LoraTrainer, make_optimizer

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        from fashion_sd.training import data, hardware
    elif not cached:
        raise SystemExit("--encoders (uncached) is measured on TensorFlow only")

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_dtype_policy(precision)
    source = models.WeightsSource("random", "random", id="random-init(seed=0)")
    which = ("diffusion_model",) if cached else ("diffusion_model", "text_encoder", "image_encoder")
    comps = models.build_components(source, resolution, which)
    set_attention(comps.diffusion_model, attention)
    layers = lora.apply_lora(comps.diffusion_model, LoraConfig(rank=RANK, alpha=ALPHA, form=lora_form,
                                                               type=lora_type))
    rng = np.random.default_rng(0)
    h = resolution // 8
    noise = dict(vae_eps=rng.standard_normal((batch, h, h, 4)).astype("float32"),
                 noise=rng.standard_normal((batch, h, h, 4)).astype("float32"),
                 timesteps=rng.integers(0, 1000, batch).astype("int32"))
    jit = hardware.resolve_jit("auto")[0] if backend == "tensorflow" else True  # JAX always jits

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

    timer = StepTimes()
    if backend == "tensorflow":
        ds = tf.data.Dataset.from_tensors(batch_data).repeat()
        trainer.fit(ds, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[timer])
    else:  # the same batch again and again, as numpy arrays
        repeated = {k: np.concatenate([v] * (steps + 1)) for k, v in batch_data.items()}
        trainer.fit(repeated, batch_size=batch, epochs=1, shuffle=False, verbose=0,
                    callbacks=[timer])
    durations = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    device_peak = _jax_peak_gb() if backend == "jax" else None
    return {"resolution": resolution, "cached": cached, "batch": batch, "precision": precision,
            "attention": attention, "lora": lora_form, "backend": backend,
            **_summary(durations[1:], durations[0], batch, resolution, device_peak),
            "xla": jit, "trainable": lora.lora_parameter_count(layers, RANK,
                                                               dora=lora_type == "dora")}


def sd14_unet(sample_size: int):
    """diffusers' U-Net with Stable Diffusion v1.4's config (v1-inference.yaml), random init."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, cross_attention_dim=768,
        attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def measure_diffusers(resolution: int, batch: int, steps: int, precision: str = "float32",
                      compiled: bool = False, lora_type: str = "lora") -> dict:
    """One step of diffusers' train_text_to_image_lora.py (cached latents and encodings), on the
    GPU when torch has one; ``compiled``: the U-Net under ``torch.compile``."""
    import contextlib

    import torch
    from diffusers import DDPMScheduler
    from peft import LoraConfig as PeftLoraConfig

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    h = resolution // 8
    unet = sd14_unet(h)
    unet.requires_grad_(False)
    unet.add_adapter(PeftLoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=True,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                    use_dora=lora_type == "dora"))
    unet.train()
    unet.to(device)
    params = [p for p in unet.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=1e-2)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(0)
    latents = (torch.randn(batch, 4, h, h, generator=g) * 0.18215).to(device)
    context = torch.randn(batch, 77, 768, generator=g).to(device)
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if precision == "mixed_bfloat16"
                else contextlib.nullcontext())
    forward = torch.compile(unet) if compiled else unet
    ends = [time.perf_counter()]
    for _ in range(steps + 1):
        noise = torch.randn(latents.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        noisy = sched.add_noise(latents, noise, t)
        with autocast:
            pred = forward(noisy, t, context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise, reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        float(loss)
        ends.append(time.perf_counter())
    durations = [b - a for a, b in zip(ends, ends[1:])]
    device_peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"resolution": resolution, "batch": batch, "precision": precision,
            **_summary(durations[1:], durations[0], batch, resolution, device_peak),
            "trainable": trainable, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": device}


def label(cfg: dict) -> str:
    if cfg.get("diffusers"):
        how = "torch.compile" if cfg.get("compiled") else "eager"
        return f"{cfg['precision']:<14} diffusers+PEFT (torch, {how}, {cfg.get('type', 'lora')})"
    return (f"{cfg['precision']:<14} {cfg.get('backend', 'tensorflow'):<10} {cfg['attention']:<7} "
            f"{cfg.get('type', 'lora'):<4} {cfg['lora']:<8} {'cached' if cfg['cached'] else 'uncached'}")


def python_for(cfg: dict, jax_python: str | None) -> str:
    """The Python that runs ``cfg``: jax needs an environment with jax (``.venv-jax``)."""
    if cfg.get("backend") != "jax":
        return sys.executable
    if jax_python:
        return jax_python
    import importlib.util

    if importlib.util.find_spec("jax") is not None:
        return sys.executable
    venv = ROOT / ".venv-jax" / "bin" / "python"
    if not venv.exists():
        sys.exit("--backend jax: this Python has no jax and .venv-jax does not exist "
                 "(make setup-jax, or --jax-python PATH)")
    return str(venv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8, help="timed steps after the first")
    ap.add_argument("--precision", default="float32", choices=["float32", "mixed_bfloat16"])
    ap.add_argument("--attention", default="fused", choices=["fused", "kerascv"])
    ap.add_argument("--lora", default="separate", choices=["separate", "merged"])
    ap.add_argument("--lora-type", default="lora", choices=["lora", "dora"],
                    help="the baseline's lora.type (the variants swap it)")
    ap.add_argument("--encoders", action="store_true",
                    help="also time the encoders run in every step (the paper's code)")
    ap.add_argument("--variants", default="all", choices=["all", "none"],
                    help="none: only the baseline (and diffusers+PEFT)")
    ap.add_argument("--no-diffusers", action="store_true", help="leave out the diffusers+PEFT step")
    ap.add_argument("--torch-compile", action="store_true",
                    help="also time diffusers+PEFT with the U-Net under torch.compile")
    ap.add_argument("--backend", nargs="+", default=["tensorflow"], choices=["tensorflow", "jax"],
                    help="Keras backends to time the baseline on; the first is the baseline")
    ap.add_argument("--jax-python", help="the Python of an environment with jax (default: this "
                                         "one if it has jax, else .venv-jax)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a JSON configuration: run only that
    args = ap.parse_args()
    if args.one:
        cfg = json.loads(args.one)
        if cfg.get("diffusers"):
            out = measure_diffusers(cfg["resolution"], args.batch, args.steps, cfg["precision"],
                                    cfg.get("compiled", False), cfg.get("type", "lora"))
        else:
            out = measure(cfg["resolution"], cfg["cached"], args.batch, args.steps,
                          cfg["precision"], cfg["attention"], cfg["lora"], cfg.get("type", "lora"))
        print(json.dumps(out))
        return
    import os

    from benchmarks._machine import describe, gpus

    base = {"precision": args.precision, "attention": args.attention, "lora": args.lora,
            "cached": True, "backend": args.backend[0], "type": args.lora_type}
    other = {"precision": {"float32": "mixed_bfloat16", "mixed_bfloat16": "float32"},
             "attention": {"fused": "kerascv", "kerascv": "fused"},
             "lora": {"separate": "merged", "merged": "separate"},
             "type": {"lora": "dora", "dora": "lora"}}
    variants = [{**base, "backend": b} for b in args.backend[1:]]
    if args.variants == "all":
        variants += [{**base, axis: other[axis][base[axis]]} for axis in other]
        # both attention and LoRA form swapped: from the default baseline, how main trained before
        variants.append({**base, "attention": other["attention"][base["attention"]],
                         "lora": other["lora"][base["lora"]]})
        if args.encoders:
            variants.append({**base, "cached": False})
    if not args.no_diffusers:
        variants.append({"diffusers": True, "precision": args.precision, "type": args.lora_type})
        if args.torch_compile:
            variants.append({"diffusers": True, "precision": args.precision, "compiled": True})
    print(f"machine: {describe()}")
    print(f"batch {args.batch}, LoRA rank {RANK}, alpha {ALPHA:g}; per configuration one fit of "
          f"{args.steps + 1} steps: the first apart, the median of the other {args.steps}; "
          f"baseline: {label(base)}")
    for res in args.resolutions:
        results = []
        for cfg in [base, *variants]:
            env = {**os.environ, "KERAS_BACKEND": cfg.get("backend", "tensorflow")}
            out = subprocess.run([python_for(cfg, args.jax_python), __file__, "--one",
                                  json.dumps({**cfg, "resolution": res}),
                                  "--batch", str(args.batch), "--steps", str(args.steps)],
                                 capture_output=True, text=True, env=env)
            if out.returncode:
                sys.exit(out.stderr[-2000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            spread = f"{min(r['step_seconds']):.2f}-{max(r['step_seconds']):.2f}"
            share = peak_share(r, ", ".join(gpus()))
            print(f"{res:>4} px {label(cfg)}: {r['seconds_per_step']:.3f} s/step (median; "
                  f"{spread}), {r['images_per_second']:.1f} img/s, first step "
                  f"{r['first_call_seconds']:.0f} s, peak RSS {r['peak_rss_gb']:.1f} GB"
                  + (f", device peak {r['device_peak_gb']:.1f} GB" if "device_peak_gb" in r else "")
                  + (f", {share:.0%} of the card's bf16 peak" if share is not None else "")
                  + (f", torch {r['torch']} on {r['device']}" if cfg.get("diffusers") else ""),
                  flush=True)
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
