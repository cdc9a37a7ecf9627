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

from fashion_sd import attention, data, hardware, images, lora, models, multiworker, preflight, remote
from fashion_sd import callbacks as cb
from fashion_sd.captions import read_captions
from fashion_sd.config import Config
from fashion_sd.errors import FashionSDError
from fashion_sd.files import atomic_write_text
from fashion_sd.generate import Sampler
from fashion_sd.rundir import RunDir
from fashion_sd.trainer import LoraTrainer, load_train_state, load_train_state_step, make_optimizer

log = logging.getLogger(__name__)

# What may change between a run and its --resume; anything else would make a different run.
RESUMABLE_CHANGES = ("train.epochs", "train.max_steps", "train.keep_last", "train.max_nonfinite",
                     "train.sample_every", "train.sample_steps", "train.sample_guidance",
                     "train.sample_seeds", "train.sample_prompts", "train.jit_compile",
                     "train.min_loss_scale", "train.strategy", "model.attention", "lora.form", "data.cache_dir", "model.cache_dir", "output.dir", "output.export")


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
    # Runs written before lora.init existed drew A as Keras does (he_uniform).
    old.setdefault("lora.init", "keras")
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
    replicas: int  # over every worker
    jit: bool
    jit_reason: str
    kind: str = "one_device"  # train.strategy as resolved
    workers: int = 1
    chief: bool = True  # the process that writes the run's files (every one but multi_worker's)


def check_inputs(cfg: Config, run: RunDir, resume: bool, fresh: bool = False,
                 chief: bool = True) -> Inputs:
    """Every check that needs no model: the run folder, the captions and images, lora.init_from,
    the weights. Raises TrainingError (or WeightsError) before anything heavy happens.

    Other workers than the chief of a multi-worker run write nothing to output.dir; they read
    the chief's train state from it when resuming (output.dir is shared: a network folder).
    """
    if chief:
        preflight.output_folder("output.dir", run.root)
    if resume and not run.train_state.is_file():
        shared = "" if chief else (" (a multi-worker run's output.dir must be a folder every "
                                   "worker sees: a network share or a GCS path)")
        raise TrainingError(f"--resume: {run.train_state} not found; nothing to resume in "
                            f"{run.root}{shared}")
    if chief and not resume and not fresh and run.train_state.is_file():
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
    paths = table.image_path.tolist()
    if paths and remote.is_remote(paths[0]):  # one request each: check a spread of about 200
        paths = paths[:: max(1, len(paths) // 200)]
    missing = [p for p in paths if not remote.is_file(p)]
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


def _mirrors(cfg: Config) -> dict[str, remote.Mirror]:
    """Local mirrors of output.dir and data.cache_dir where they are URLs (gs://...), checked
    writable and filled from what the remote folders already hold (see fashion_sd.remote)."""
    mirrors = {}
    for key, url in (("output.dir", cfg.output.dir), ("data.cache_dir", cfg.data.cache_dir)):
        if remote.is_remote(url):
            mirror = remote.Mirror(url)
            try:
                mirror.check(key)
            except remote.RemoteError as exc:
                raise TrainingError(str(exc)) from None
            pulled = mirror.pull()
            print(f"{key} {url}: worked on in {mirror.local} ({pulled} file(s) copied in), each "
                  "file copied out as it is written")
            mirrors[key] = mirror
    return mirrors


def resolve_machine(cfg: Config) -> Machine:
    """Precision, replicas and XLA for this machine and config, refusing what cannot run."""
    kind = hardware.resolve_strategy(cfg.train.strategy)
    precision = hardware.resolve_precision(cfg.train.precision, tpu=kind == "tpu")
    spec = hardware.tf_config() if kind == "multi_worker" else None
    try:
        strategy = hardware.strategy(kind)
    except hardware.StrategyError as exc:
        raise TrainingError(str(exc)) from None
    replicas = strategy.num_replicas_in_sync
    jit, jit_reason = hardware.resolve_jit(cfg.train.jit_compile, replicas,
                                           cfg.train.deterministic)
    if jit and replicas > 1:
        raise TrainingError(f"train.jit_compile: true with {replicas} replicas: the trainer's "
                            "cross-replica skip of non-finite steps uses merge_call, which "
                            "TensorFlow forbids under XLA; set train.jit_compile: auto or false")
    if kind == "tpu":  # a TPU runs only what XLA compiled; no choice to record
        jit, jit_reason = False, "tpu: TPUStrategy compiles every step with XLA itself"
    if cfg.train.batch_size % replicas:
        raise TrainingError(f"train.batch_size={cfg.train.batch_size} (the global batch) must be "
                            f"a multiple of the {replicas} replicas it is split over")
    workers = len(spec["cluster"].get("worker", [])) + len(spec["cluster"].get("chief", [])) \
        if spec else 1
    # TensorFlow's own answer to "does this process write?": the chief task, or worker 0 when
    # the cluster names no chief; every single-process strategy says yes.
    return Machine(precision, strategy, replicas, jit, jit_reason, kind, workers,
                   strategy.extended.should_checkpoint)


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
    # ---- inputs first: nothing heavy happens, and nothing is deleted, before these pass
    machine = resolve_machine(cfg)
    mirrors = _mirrors(cfg)
    run = RunDir(mirrors["output.dir"].local if "output.dir" in mirrors else cfg.output.dir)
    inputs = check_inputs(cfg, run, resume, fresh, machine.chief)

    def push():  # a remote output.dir gets each file as soon as it is written (the chief's)
        if "output.dir" in mirrors and machine.chief:
            mirrors["output.dir"].push()

    if fresh and machine.chief:
        for name in RunDir.OUTPUTS:
            p = run.root / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        push()
    if inputs.n_val == 0:
        log.warning("%s: the val split is empty, so best.lora.safetensors is chosen by train loss "
                    "(recorded in run.json as best_by); give captions.split.val > 0 for a "
                    "held-out choice", cfg.data.captions)
    source, t = inputs.source, cfg.train
    if t.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(cfg.seed)
    keras.mixed_precision.set_dtype_policy(machine.precision)
    if machine.chief:
        run.root.mkdir(parents=True, exist_ok=True)
        if not resume:
            cfg.save(run.config)
        push()
    print(f"weights: {source.label}\nprecision: {machine.precision}, XLA: {machine.jit} "
          f"({machine.jit_reason}), replicas: {machine.replicas}")
    if machine.replicas > 1 or machine.kind != "one_device":
        # The learning rate is never rescaled for the replica count: say what runs.
        print(f"strategy: {machine.kind}, {machine.workers} worker(s), {machine.replicas} "
              f"replica(s); global batch {t.batch_size} ({t.batch_size // machine.replicas} per "
              f"replica); learning rate {t.learning_rate:g} as configured (not scaled)"
              + ("" if machine.chief else "; this worker writes nothing, the chief writes the "
                 "run's files"))

    # ---- frozen encoders once, through the cache
    with machine.strategy.scope():
        comps = build(source, cfg.data.resolution)
    attention.set_attention(comps.diffusion_model, cfg.model.attention)
    if cfg.lora.text_encoder:
        print("lora.text_encoder: the text encoder trains, so captions are encoded at every step "
              "(no text cache for this run); the VAE cache is kept")
    cache = mirrors.get("data.cache_dir")
    encoded = data.encode_dataset(inputs.table, comps, cache.local if cache else cfg.data.cache_dir,
                                  cfg.data.resolution, progress,
                                  text_cache=not cfg.lora.text_encoder,
                                  shard_rows=cfg.data.shard_rows, cache_dtype=cfg.data.cache_dtype,
                                  on_write=cache.push if cache and machine.chief else None)
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
            print(f"EMA of the LoRA weights (diffusers' EMAModel: decay min({t.ema_decay:g}, "
                  "(1 + k) / (10 + k)) after optimizer step k): "
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
             "strategy": machine.kind, "workers": machine.workers,
             "steps_per_epoch": spe, "train_images": inputs.n_train, "val_images": inputs.n_val,
             "best_by": "val_loss" if inputs.n_val else "train_loss",
             "distinct_captions": int(inputs.table.caption.nunique()),
             "options": {k: getattr(t, k) for k in ("snr_gamma", "noise_offset",
                                                     "caption_dropout", "ema_decay")},
             "text_encoder_lora": bool(te_layers)}
    if machine.chief:
        write_run_json(run, cfg, source, extra)
        push()
    if state.step >= end:
        print(f"nothing to do: the run already reached step {state.optimizer_step}")
        return extra

    # ---- fit: a partial first epoch when resuming mid-epoch, then whole epochs
    metadata = {"base_weights": source.id, "random_init": str(source.is_random).lower(),
                "caption_template": cfg.captions.template,
                "resolution": str(cfg.data.resolution)}
    if cfg.lora.init_from:
        metadata["init_from"] = str(cfg.lora.init_from)
    else:  # how A started (B = 0): the config's lora.init, so a checkpoint says how to repeat it
        metadata["lora_init"] = cfg.lora.init
    if machine.jit:
        comps.diffusion_model.compile(jit_compile=True)  # XLA for the sampler's predict calls
    sampler = Sampler(comps, local=machine.kind == "multi_worker")
    evaluating = []
    if t.eval_every and machine.chief:  # the chief scores; the other workers wait for it
        from fashion_sd.evaluate import Scorer  # noqa: PLC0415 - Inception, CLIP: only when asked

        print(f"evaluating every {t.eval_every} epoch(s) on {t.eval_images} {cfg.eval.split} "
              f"prompts -> {run.eval}")
        scorer = Scorer(cfg, num_images=t.eval_images, out=run.eval, progress=progress)
        scorer.judge  # noqa: B018 - CLIP now: a missing download fails before the first step
        evaluating = [cb.EvalDuringTraining(state, scorer, sampler, t, source.id, source.label)]
    writers = [
        cb.Checkpointer(state, layers, cfg, metadata, source.label,
                        monitor="val_loss" if inputs.n_val else "loss"),
        cb.SampleGrids(state, sampler, t, source.label),
        *evaluating,
        # EMA: val loss of the EMA weights, raw weights kept across fit segments.
        *([cb.EmaValidation(), cb.KeepRawWeights()] if t.ema_decay else []),
        keras.callbacks.TensorBoard(str(run.tensorboard)),
        *([cb.AfterWrites(push)] if "output.dir" in mirrors else []),  # last: after every write
    ]
    # Every worker counts steps and stops alike; only the chief writes.
    callbacks = [cb.StepGuard(state, t.max_nonfinite, t.min_loss_scale),
                 *(writers if machine.chief else [])]
    val = data.val_dataset(encoded, t.batch_size, cfg.seed, t.val_repeats)
    for initial, stop, steps in fit_segments(state.step, spe, end):
        if state.stop_reason:
            break
        start = state.step
        ds = data.train_dataset(encoded, t.batch_size, cfg.seed, start,
                                min(end, start + (stop - initial) * steps), cfg.data.flip,
                                t.noise_offset, t.caption_dropout)
        if machine.kind == "multi_worker":  # Keras' fit cannot (see fashion_sd.multiworker)
            try:
                multiworker.fit(trainer, machine.strategy, ds, epochs=stop, initial_epoch=initial,
                                steps_per_epoch=steps, validation_data=val, callbacks=callbacks,
                                verbose=verbose, chief=machine.chief)
            except multiworker.LOST_WORKER as exc:
                push()
                saved = load_train_state_step(run.train_state)
                raise TrainingStopped(
                    f"a worker of the cluster was lost at step {state.optimizer_step} "
                    f"({str(exc).strip().splitlines()[0][:200]}). "
                    + (f"The train state in {run.train_state} (step {saved}) is intact: "
                       if saved is not None else "No train state was written yet: ")
                    + "restart every worker with the same command and --resume"
                    + ("" if saved is not None else " removed")) from None
        else:
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
    if machine.chief:
        write_run_json(run, cfg, source, summary)
        push()
    if machine.kind == "multi_worker":
        multiworker.barrier(machine.strategy)
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
    loss = summary.get("final_loss")
    # A multi-worker run's other workers keep no history: the chief's line has the losses.
    loss_text = f", loss {loss:.4f}{val_text}" if loss is not None else ""
    return (f"{summary['status']}: step {summary['step']} (epoch {summary['epoch']:g})"
            f"{loss_text}, {summary['skipped_steps']} skipped steps, "
            f"{summary['seconds_this_session']:.0f} s -> {out}")

