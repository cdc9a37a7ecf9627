"""A training run from a config: check inputs, build, cache, fit, and leave files behind.

``output.dir`` receives a run's folder (:class:`fashion_sd.rundir.RunDir` names its files);
``resume=True`` continues from its train state exactly where the run stopped.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import tensorflow as tf

from fashion_sd import attention, data, hardware, images, lora, models, preflight
from fashion_sd import callbacks as cb
from fashion_sd.captions import read_captions
from fashion_sd.config import Config
from fashion_sd.errors import FashionSDError
from fashion_sd.files import atomic_write_text
from fashion_sd.generate import Sampler
from fashion_sd.rundir import RunDir
from fashion_sd.trainer import LoraTrainer, load_train_state, make_optimizer

log = logging.getLogger(__name__)

# What may change between a run and its --resume; anything else would make a different run.
RESUMABLE_CHANGES = ("train.epochs", "train.max_steps", "train.keep_last", "train.max_nonfinite",
                     "train.sample_every", "train.sample_steps", "train.sample_guidance",
                     "train.sample_seeds", "train.sample_prompts", "train.jit_compile",
                     "train.min_loss_scale", "model.attention", "lora.form", "data.cache_dir", "model.cache_dir", "output.dir", "output.export")


class TrainingError(FashionSDError, RuntimeError):
    """A run that cannot start or had to stop; the message says why and what to do."""


class TrainingStopped(TrainingError):
    """A run that started and stopped (non-finite losses, a collapsed loss scale): not bad
    input, so the command exits 1, not 2."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("include", "exclude"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: Path, cfg: Config) -> None:
    old = _flat(_load_yaml(saved))
    new = _flat(cfg.to_dict())
    diffs = [f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES]
    if diffs:
        raise TrainingError(f"--resume with a config that differs from {saved}:\n  "
                            + "\n  ".join(diffs) + "\nresume with the run's own config, or start a "
                            "new run in another output.dir")


def _load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def write_run_json(run: RunDir, cfg: Config, source: models.WeightsSource, extra: dict) -> None:
    record = {"config": cfg.to_dict(), "weights": source.to_dict(),
              "random_init": source.is_random, "versions": hardware.versions(),
              "machine": hardware.describe(), **extra}
    atomic_write_text(run.run_json, json.dumps(record, indent=2, default=str) + "\n")


def train(cfg: Config, resume: bool = False, fresh: bool = False, progress=data.tqdm_progress,
          verbose: int = 1, build=models.build_components) -> dict:
    """Run (or resume) the training that ``cfg`` describes; returns the summary it records.

    ``fresh`` deletes an earlier run's outputs in output.dir first (never other files there).
    ``build(source, resolution)`` makes the components (tests pass small ones). The run sets
    Keras' global dtype policy and TensorFlow's op determinism as its config says, and puts the
    caller's back when it ends (a notebook may generate or train again in the same process).
    """
    # TensorFlow's public API can only switch determinism on; Keras reads the same private flag.
    from tensorflow.python.framework import config as tf_config

    policy = keras.mixed_precision.dtype_policy()
    deterministic = tf_config.is_op_determinism_enabled()
    try:
        return _train(cfg, resume, fresh, progress, verbose, build)
    finally:
        keras.mixed_precision.set_dtype_policy(policy)
        if not deterministic:
            tf_config.disable_op_determinism()


@dataclass
class Inputs:
    """What the checks before any heavy work found: the captions and where the weights are."""

    table: object  # the captions table
    n_train: int
    n_val: int  # 0: best.lora.safetensors is chosen by train loss
    source: models.WeightsSource
    init_meta: dict | None  # lora.init_from's metadata (checked), when the run starts from it


@dataclass
class Machine:
    precision: str
    strategy: object
    replicas: int
    jit: bool
    jit_reason: str


def check_inputs(cfg: Config, run: RunDir, resume: bool, fresh: bool = False) -> Inputs:
    """Every check that needs no model: the run folder, the captions and images, lora.init_from,
    the weights. Raises TrainingError (or WeightsError) before anything heavy happens."""
    preflight.output_folder("output.dir", run.root)
    if resume and not run.train_state.is_file():
        raise TrainingError(f"--resume: {run.train_state} not found; nothing to resume in {run.root}")
    if not resume and not fresh and run.train_state.is_file():
        raise TrainingError(f"{run.root} already holds a run ({run.train_state}); continue it with "
                            "--resume, start over with --fresh, or set output.dir to a new folder")
    if resume:
        try:
            preflight.safetensors_header(run.train_state)
        except (ValueError, OSError) as exc:
            raise TrainingError(f"--resume: {run.train_state} is damaged ({exc}); resume cannot "
                                f"use it. Start over with --fresh, or train from a checkpoint: "
                                f"--set lora.init_from={run.last}") from None
        check_resume_config(run.config, cfg)
    table = read_captions(cfg.data.captions)
    n_train = int((table.split == "train").sum())
    if n_train < cfg.train.batch_size:
        raise TrainingError(f"{cfg.data.captions}: {n_train} training rows cannot fill one batch of "
                            f"train.batch_size={cfg.train.batch_size}")
    if (table.image_path == "").any():
        raise TrainingError(f"{cfg.data.captions}: rows without image_path; rebuild it with "
                            "scripts/build_captions.py --images DIR")
    missing = [p for p in table.image_path if not Path(p).is_file()]
    if missing:
        raise TrainingError(f"{cfg.data.captions}: {len(missing)} image(s) not found, e.g. "
                            f"{missing[0]}; rebuild the captions or fix data.images")
    if warning := images.upscale_warning(images.upscale_factors(table.image_path,
                                                                 cfg.data.resolution),
                                         cfg.data.resolution):
        log.warning("%s", warning)
    init_meta = None
    if cfg.lora.init_from and not resume:  # checked now; loaded once the LoRA layers exist
        try:
            init_meta = lora.check_init_from(cfg.lora.init_from, cfg.lora)
        except lora.LoraError as exc:
            raise TrainingError(str(exc)) from None
    if cfg.train.eval_every:
        from fashion_sd.evaluate import make_plan  # noqa: PLC0415
        from fashion_sd.metrics.clip import check_spec  # noqa: PLC0415

        make_plan(cfg, cfg.eval.split, cfg.train.eval_images)  # the split it scores is not empty
        check_spec(cfg.eval.clip)
    source = models.resolve_weights(cfg.model.weights, cache_dir=cfg.model.cache_dir, seed=cfg.seed)
    return Inputs(table, n_train, int((table.split == "val").sum()), source, init_meta)


def resolve_machine(cfg: Config) -> Machine:
    """Precision, replicas and XLA for this machine and config, refusing what cannot run."""
    precision = hardware.resolve_precision(cfg.train.precision)
    strategy = hardware.strategy()
    replicas = strategy.num_replicas_in_sync
    jit, jit_reason = hardware.resolve_jit(cfg.train.jit_compile, replicas,
                                           cfg.train.deterministic)
    if jit and replicas > 1:
        raise TrainingError(f"train.jit_compile: true with {replicas} replicas: the trainer's "
                            "cross-replica skip of non-finite steps uses merge_call, which "
                            "TensorFlow forbids under XLA; set train.jit_compile: auto or false")
    if cfg.train.batch_size % replicas:
        raise TrainingError(f"train.batch_size={cfg.train.batch_size} must be a multiple of the "
                            f"{replicas} GPUs it is split over")
    return Machine(precision, strategy, replicas, jit, jit_reason)


def fit_segments(step: int, steps_per_epoch: int, end: int) -> list[tuple[int, int, int]]:
    """The ``fit`` calls that take a run from micro-batch ``step`` to ``end``, as
    ``(initial_epoch, epochs, steps_per_epoch)``: a partial epoch first when resuming mid-epoch,
    then whole epochs (the last may be cut short by ``end``, which the step guard enforces)."""
    epochs = -(-end // steps_per_epoch)
    first_epoch, offset = divmod(step, steps_per_epoch)
    segments = []
    if offset:
        segments.append((first_epoch, first_epoch + 1, steps_per_epoch - offset))
        first_epoch += 1
    if first_epoch < epochs:
        segments.append((first_epoch, epochs, steps_per_epoch))
    return segments


def _train(cfg: Config, resume, fresh, progress, verbose, build) -> dict:
    t_start = time.time()
    run = RunDir(cfg.output.dir)
    # ---- inputs first: nothing heavy happens, and nothing is deleted, before these pass
    inputs = check_inputs(cfg, run, resume, fresh)
    machine = resolve_machine(cfg)
    if fresh:
        for name in RunDir.OUTPUTS:
            p = run.root / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if inputs.n_val == 0:
        log.warning("%s: the val split is empty, so best.lora.safetensors is chosen by train loss "
                    "(recorded in run.json as best_by); give captions.split.val > 0 for a "
                    "held-out choice", cfg.data.captions)
    source, t = inputs.source, cfg.train
    if t.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(cfg.seed)
    keras.mixed_precision.set_dtype_policy(machine.precision)
    run.root.mkdir(parents=True, exist_ok=True)
    if not resume:
        cfg.save(run.config)
    print(f"weights: {source.label}\nprecision: {machine.precision}, XLA: {machine.jit} "
          f"({machine.jit_reason}), replicas: {machine.replicas}")

    # ---- frozen encoders once, through the cache
    with machine.strategy.scope():
        comps = build(source, cfg.data.resolution)
    attention.set_attention(comps.diffusion_model, cfg.model.attention)
    if cfg.lora.text_encoder:
        print("lora.text_encoder: the text encoder trains, so captions are encoded at every step "
              "(no text cache for this run); the VAE cache is kept")
    encoded = data.encode_dataset(inputs.table, comps, cfg.data.cache_dir, cfg.data.resolution,
                                  progress, text_cache=not cfg.lora.text_encoder,
                                  shard_rows=cfg.data.shard_rows, cache_dtype=cfg.data.cache_dtype)
    comps.image_encoder = None  # not needed past the cache
    spe = inputs.n_train // t.batch_size
    total = t.epochs * spe
    end = min(total, t.max_steps * t.grad_accum) if t.max_steps else total
    with machine.strategy.scope():
        layers = lora.apply_lora(comps.diffusion_model, cfg.lora)
        if inputs.init_meta is not None:
            try:
                lora.init_from(cfg.lora.init_from, layers, cfg.lora)
            except lora.LoraError as exc:
                raise TrainingError(str(exc)) from None
            print(f"LoRA starts from {cfg.lora.init_from}")
        te_layers = {}
        if cfg.lora.text_encoder:
            te_layers = lora.apply_text_encoder_lora(comps.text_encoder, cfg.lora)
            print(f"text-encoder LoRA: {len(te_layers)} projections, learning rate "
                  f"{t.text_encoder_lr or t.learning_rate:g}")
        layers = {**layers, **te_layers}  # one checkpoint holds both (te00.q_proj, ...)
        if t.ema_decay:
            print(f"EMA of the LoRA weights (decay {t.ema_decay:g} per optimizer step): "
                  f"checkpoints hold it, their raw weights go to {run.checkpoints / 'raw'}")
        trainable = lora.lora_parameter_count(layers, cfg.lora.rank)
        print(f"trainable LoRA parameters: {trainable:,} "
              f"({len(layers)} projections, rank {cfg.lora.rank})")
        trainer = LoraTrainer(comps.diffusion_model, snr_gamma=t.snr_gamma,
                              text_encoder=comps.text_encoder if te_layers else None)
        te_vars = [v for d in te_layers.values() for v in (d.lora_kernel_a, d.lora_kernel_b)]
        trainer.compile(optimizer=make_optimizer(t, max(1, total // t.grad_accum),
                                                 machine.precision, machine.replicas, te_vars),
                        jit_compile=machine.jit)
        trainer.optimizer.build(trainer.trainable_variables)

    state = cb.RunState(run.root, spe, t.grad_accum, end, total)
    if resume:
        info = load_train_state(run.train_state, trainer, layers)
        state.step, state.best_val = info["step"], info["best_val"]
        state.elapsed = info["elapsed"]
        state.history = cb.read_history(run.history, state.optimizer_step)
        print(f"resuming at step {state.optimizer_step} (epoch {state.epoch_progress:g})")
        if info.get("schedule") != cb.SCHEDULE:
            log.warning("%s was written before the learning-rate schedule counted optimizer steps "
                        "(warm-up and decay counted micro-batches with train.grad_accum > 1, and "
                        "the first warm-up step had rate 0); the rest of this run follows the "
                        "new schedule, and its val loss draws other noise", run.train_state)
    # What actually runs: Keras may still turn XLA off (e.g. a layer that does not support it).
    jit_used = bool(trainer.jit_compile)
    extra = {"status": "running", "trainable_parameters": trainable,
             "precision": machine.precision, "jit_compile": jit_used,
             "jit_reason": machine.jit_reason if jit_used == machine.jit
             else f"{machine.jit_reason}; Keras turned it off",
             "attention": cfg.model.attention, "lora_form": cfg.lora.form,
             "loss_scaling": machine.precision == "mixed_float16", "replicas": machine.replicas,
             "steps_per_epoch": spe, "train_images": inputs.n_train, "val_images": inputs.n_val,
             "best_by": "val_loss" if inputs.n_val else "train_loss",
             "distinct_captions": int(inputs.table.caption.nunique()),
             "options": {k: getattr(t, k) for k in ("snr_gamma", "noise_offset",
                                                     "caption_dropout", "ema_decay")},
             "text_encoder_lora": bool(te_layers)}
    write_run_json(run, cfg, source, extra)
    if state.step >= end:
        print(f"nothing to do: the run already reached step {state.optimizer_step}")
        return extra

    # ---- fit: a partial first epoch when resuming mid-epoch, then whole epochs
    metadata = {"base_weights": source.id, "random_init": str(source.is_random).lower(),
                "caption_template": cfg.captions.template,
                "resolution": str(cfg.data.resolution)}
    if cfg.lora.init_from:
        metadata["init_from"] = str(cfg.lora.init_from)
    if machine.jit:
        comps.diffusion_model.compile(jit_compile=True)  # XLA for the sampler's predict calls
    sampler = Sampler(comps)
    evaluating = []
    if t.eval_every:
        from fashion_sd.evaluate import Scorer  # noqa: PLC0415 - Inception, CLIP: only when asked

        print(f"evaluating every {t.eval_every} epoch(s) on {t.eval_images} {cfg.eval.split} "
              f"prompts -> {run.eval}")
        scorer = Scorer(cfg, num_images=t.eval_images, out=run.eval, progress=progress)
        scorer.judge  # noqa: B018 - CLIP now: a missing download fails before the first step
        evaluating = [cb.EvalDuringTraining(state, scorer, sampler, t, source.id, source.label)]
    callbacks = [
        cb.StepGuard(state, t.max_nonfinite, t.min_loss_scale),
        cb.Checkpointer(state, layers, cfg, metadata, source.label,
                        monitor="val_loss" if inputs.n_val else "loss"),
        cb.SampleGrids(state, sampler, t, source.label),
        *evaluating,
        # EMA: val loss of the EMA weights, raw weights kept across fit segments.
        *([cb.EmaValidation(), cb.KeepRawWeights()] if t.ema_decay else []),
        keras.callbacks.TensorBoard(str(run.tensorboard)),
    ]
    val = data.val_dataset(encoded, t.batch_size, cfg.seed, t.val_repeats)
    for initial, stop, steps in fit_segments(state.step, spe, end):
        if state.stop_reason:
            break
        start = state.step
        ds = data.train_dataset(encoded, t.batch_size, cfg.seed, start,
                                min(end, start + (stop - initial) * steps), cfg.data.flip,
                                t.noise_offset, t.caption_dropout)
        trainer.fit(ds, epochs=stop, initial_epoch=initial, steps_per_epoch=steps,
                    validation_data=val, callbacks=callbacks, verbose=verbose, shuffle=False)

    last = state.history[-1] if state.history else {}
    summary = {**extra, "status": "finished" if state.step >= total else "stopped",
               "stop_reason": state.stop_reason, "step": state.optimizer_step,
               "epoch": state.epoch_progress, "final_loss": last.get("loss"),
               "final_val_loss": last.get("val_loss"),
               "best_val_loss": (state.best_val if inputs.n_val and math.isfinite(state.best_val)
                                 else None),
               "best_train_loss": (state.best_val if not inputs.n_val
                                   and math.isfinite(state.best_val) else None),
               "skipped_steps": int(trainer.skipped_steps.numpy()),
               "overflow_steps": int(trainer.overflow_steps.numpy()),
               "seconds_this_session": round(time.time() - t_start, 1)}
    write_run_json(run, cfg, source, summary)
    if state.stop_reason == "nonfinite":
        raise TrainingStopped(
            f"stopped at step {state.optimizer_step}: {t.max_nonfinite} non-finite losses "
            f"in a row. The last checkpoint ({run.last}) is intact. Lower train.learning_rate, "
            "or use train.precision: float32.")
    if state.stop_reason == "loss_scale":
        raise TrainingStopped(
            f"stopped at step {state.optimizer_step}: the float16 loss scale fell below "
            f"train.min_loss_scale={t.min_loss_scale:g} ({summary['overflow_steps']} "
            "overflow steps): gradients overflow float16 even unscaled, and smaller scales would "
            f"let them underflow silently. The last checkpoint ({run.last}) is intact. Use "
            "train.precision: mixed_bfloat16 (Ampere or newer) or float32, or lower "
            "train.learning_rate.")
    return summary


def summary_line(summary: dict, out: str) -> str:
    val = summary.get("final_val_loss")
    val_text = f", val {val:.4f}" if val is not None and math.isfinite(val) else ""
    return (f"{summary['status']}: step {summary['step']} (epoch {summary['epoch']:g}), loss "
            f"{summary['final_loss']:.4f}{val_text}, {summary['skipped_steps']} skipped steps, "
            f"{summary['seconds_this_session']:.0f} s -> {out}")

