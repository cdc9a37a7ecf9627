"""A training run from a config, read as its phases: resolve, prepare, build, restore, fit, finish.

:func:`train` is the table of contents; :class:`TrainingRun` holds one method per phase, each
with one job, in the order they run. The phases hand each other what they make: ``resolve``
returns a :class:`Setting`, ``build`` a :class:`Built`, and every later phase takes them; the
run object itself holds only the config and how to report.

1. ``resolve``: the machine (precision, replicas, XLA), the run folder (its writer and remote
   mirror) and every input check that needs no model (``training/inputs.py``, done before
   Keras loaded when the command could). Nothing heavy runs, nothing is deleted.
2. ``prepare``: under the folder's lock, ``--fresh`` clears an earlier run, the config is saved.
3. ``build``: components in the strategy's scope, the frozen encoders through the cache, LoRA
   (U-Net, and the text encoder as a variant), the trainer with its optimizer *built*, because
   a train state can only be loaded into built optimizer variables.
4. ``restore``: ``--resume`` loads the train state and the history up to its step.
5. ``fit``: the ``fit`` segments (a partial epoch first when resuming mid-epoch); multi-worker is
   a variant of this phase.
6. ``finish``: the summary in run.json, then why the run stopped early, if it did.

Global Keras state (dtype policy, op determinism) is set for the run and put back after it by
:func:`keras_state`. ``output.dir`` receives the run's folder (:class:`fashion_sd.rundir.RunDir`
names its files, :class:`fashion_sd.training.writer.RunWriter` writes them); ``resume=True`` continues
from its train state exactly where the run stopped, which may be mid-epoch
(``train.save_every_steps``, or a SIGTERM: :mod:`fashion_sd.training.stopping`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import keras

from fashion_sd import preflight, remote
from fashion_sd.config import Config
from fashion_sd.errors import BackendError
from fashion_sd.precision import dtype_policy
from fashion_sd.evaluation.evaluate import Parts, Scope, Scorer
from fashion_sd.files import DiskFull
from fashion_sd.progress import tqdm_progress
from fashion_sd.rundir import RunDir
from fashion_sd.sd import attention, lora, models
from fashion_sd.serving.generate import Sampler
from fashion_sd.training import callbacks as cb
from fashion_sd.training import data
from fashion_sd.training.draws import DRAWS, LEGACY
from fashion_sd.training.inputs import Inputs, TrainingError, check_inputs, resume_draws
from fashion_sd.training.stopping import stop_requests
from fashion_sd.training.trainer import (
    LoraTrainer,
    load_train_state,
    load_train_state_step,
    make_optimizer,
)
from fashion_sd.training.writer import RunWriter

log = logging.getLogger(__name__)

class TrainingStopped(TrainingError):
    """A run that started and stopped (non-finite losses, a collapsed loss scale, a full disk):
    not bad input, so the command exits 1, not 2."""

    exit_code = 1


class TrainingInterrupted(TrainingError):
    """SIGTERM / SIGINT: the run saved its train state at the step it reached and stopped;
    ``exit_code`` is the shell's 128 + signal."""

    prefix = ""  # not an error: the run did what was asked

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def train(cfg: Config, resume: bool = False, fresh: bool = False, progress=tqdm_progress,
          verbose: int = 1, build=models.build_components, inputs: Inputs | None = None) -> dict:
    """Run (or resume) the training that ``cfg`` describes; returns the summary it records.

    ``fresh`` deletes an earlier run's outputs in output.dir first (never other files there).
    ``build(source, resolution)`` makes the components (tests pass small ones). ``inputs``: what
    :func:`~fashion_sd.training.inputs.early_checks` found before Keras loaded (else checked here).
    """
    run = TrainingRun(cfg, resume, fresh, progress, verbose, build)
    s = run.resolve(inputs)
    with s.writer.lock(), keras_state(cfg, s.machine), stop_requests() as stop:
        run.prepare(s)
        b = run.build(s)
        run.restore(s, b)
        if b.state.step >= b.state.end_step:  # before run.json is touched: it keeps the summary
            print(f"nothing to do: the run already reached step {b.state.optimizer_step}")
            return s.run.read_record() or run.record(s, b, "finished", step=b.state.optimizer_step)
        s.writer.write_record(run.record(s, b, "running"))
        run.fit(s, b, stop)
        return run.finish(s, b)


def on_tensorflow() -> bool:
    return keras.config.backend() == "tensorflow"


def machine_module():
    """What describes and resolves this machine for the backend Keras runs on: tf.distribute's
    :mod:`~fashion_sd.training.hardware` or :mod:`~fashion_sd.training.jax_machine`, each
    importing its backend's library (so imported here, at the boundary)."""
    if on_tensorflow():
        from fashion_sd.training import hardware
        return hardware
    if keras.config.backend() == "jax":
        from fashion_sd.training import jax_machine
        return jax_machine
    raise BackendError(f"KERAS_BACKEND={keras.config.backend()}: training runs on tensorflow "
                       "or jax")


@contextlib.contextmanager
def _op_determinism(on: bool):
    """TensorFlow's op determinism while ``on``. Its public API can only switch it on; Keras
    reads the same private flag. JAX needs none on a CPU, where XLA's results do not vary from
    run to run (GPUs: XLA_FLAGS=--xla_gpu_deterministic_ops=true, set before JAX starts)."""
    if not on_tensorflow():
        yield
        return
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config

    before = tf_config.is_op_determinism_enabled()
    try:
        if on:
            tf.config.experimental.enable_op_determinism()
        yield
    finally:
        if not before:
            tf_config.disable_op_determinism()


@contextlib.contextmanager
def keras_state(cfg: Config, machine):
    """The run's global Keras/TensorFlow state (seed, dtype policy, op determinism), and the
    caller's put back after it (a notebook may generate or train again in the same process)."""
    with dtype_policy(machine.precision), _op_determinism(cfg.train.deterministic):
        keras.utils.set_random_seed(cfg.seed)
        yield


# --------------------------------------------------------------------------------------------
# Resolve: what the run needs, checked before anything heavy


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


@dataclass
class Setting:
    """What ``resolve`` finds, before anything heavy: the machine, the run folder and its one
    writer, the checked inputs and how the run draws its noise."""

    machine: Machine
    mirrors: dict  # local mirrors of URLs (output.dir, data.cache_dir), by config key
    run: RunDir
    inputs: Inputs
    draws: str
    writer: RunWriter


@dataclass
class Built:
    """What ``build`` makes and the later phases use: the components, the encoded data, the LoRA
    layers, the trainer with its optimizer built, and the run's position and bookkeeping."""

    comps: models.Components
    encoded: object  # data.encode_dataset's arrays
    layers: dict  # every LoRA layer by checkpoint key (U-Net and text encoder)
    trainer: LoraTrainer
    te_lora: bool
    trainable: int  # LoRA parameters
    state: cb.RunState


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
    if not on_tensorflow():
        t = cfg.train
        try:
            precision, devices, jit, reason, kind, workers, chief = machine_module().resolve(
                t.strategy, t.precision, t.jit_compile, t.batch_size)
        except (BackendError, preflight.InputError) as exc:
            raise TrainingError(str(exc)) from None
        return Machine(precision, devices, devices.replicas, jit, reason, kind, workers, chief)
    hardware = machine_module()
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


# --------------------------------------------------------------------------------------------
# The run, phase by phase


class TrainingRun:
    """One run of :func:`train`; each public method is one phase (see the module docstring). It
    holds the config, the command's options and the session's start; each phase's products
    are passed on, never stored here."""

    def __init__(self, cfg: Config, resume: bool, fresh: bool, progress, verbose: int, build):
        self.cfg, self.resume, self.fresh = cfg, resume, fresh
        self.progress, self.verbose, self._build = progress, verbose, build
        self.t_start = time.time()

    # ---- 1. resolve
    def resolve(self, inputs: Inputs | None = None) -> Setting:
        machine = resolve_machine(self.cfg)
        mirrors = _mirrors(self.cfg)
        out = mirrors.get("output.dir")
        run = RunDir(out.local if out else self.cfg.output.dir)
        if inputs is None:
            inputs = check_inputs(self.cfg, run, self.resume, self.fresh, machine.chief)
        draws = (resume_draws(run.train_state, keras.config.backend()) if self.resume
                 else DRAWS)
        return Setting(machine, mirrors, run, inputs, draws, RunWriter(run, machine.chief, out))

    # ---- 2. prepare
    def prepare(self, s: Setting) -> None:
        cfg, machine, t = self.cfg, s.machine, self.cfg.train
        if self.fresh:
            s.writer.clear()
        if s.inputs.n_val == 0:
            log.warning("%s: the val split is empty, so best.lora.safetensors is chosen by train "
                        "loss (recorded in run.json as best_by); give captions.split.val > 0 for "
                        "a held-out choice", cfg.data.captions)
        if not self.resume:
            s.writer.save_config(cfg)
        print(f"weights: {s.inputs.source.label}\nprecision: {machine.precision}, XLA: "
              f"{machine.jit} ({machine.jit_reason}), replicas: {machine.replicas}")
        if machine.replicas > 1 or machine.kind != "one_device":
            # The learning rate is never rescaled for the replica count: say what runs.
            print(f"strategy: {machine.kind}, {machine.workers} worker(s), {machine.replicas} "
                  f"replica(s); global batch {t.batch_size} ({t.batch_size // machine.replicas} "
                  f"per replica); learning rate {t.learning_rate:g} as configured (not scaled)"
                  + ("" if machine.chief else "; this worker writes nothing, the chief writes "
                     "the run's files"))

    # ---- 3. build
    def build(self, s: Setting) -> Built:
        cfg, t = self.cfg, self.cfg.train
        with s.machine.strategy.scope():
            comps = self._build(s.inputs.source, cfg.data.resolution)
        attention.set_attention(comps.diffusion_model, cfg.model.attention)
        encoded = self._encode(s, comps)
        comps.image_encoder = None  # not needed past the cache
        spe = s.inputs.n_train // t.batch_size
        total = t.epochs * spe
        end = min(total, t.max_steps * t.grad_accum) if t.max_steps else total
        with s.machine.strategy.scope():
            layers, te_layers, trainable = self._lora(s, comps)
            trainer = LoraTrainer(comps.diffusion_model, snr_gamma=t.snr_gamma,
                                  text_encoder=comps.text_encoder if te_layers else None,
                                  mask_background=t.mask_background_weight,
                                  mask_normalize=t.mask_normalize)
            te_vars = lora.lora_variables(te_layers)  # A, B (and DoRA's m) at text_encoder_lr
            trainer.compile(optimizer=make_optimizer(
                t, max(1, total // t.grad_accum), s.machine.precision,
                s.machine.replicas, te_vars), jit_compile=s.machine.jit)
            trainer.optimizer.build(trainer.trainable_variables)
        state = cb.RunState(s.run.root, spe, t.grad_accum, end, total,
                            monitor="val_loss" if s.inputs.n_val else "loss", draws=s.draws)
        return Built(comps, encoded, layers, trainer, bool(te_layers), trainable, state)

    def _encode(self, s: Setting, comps):
        """The frozen encoders' outputs, once, through the cache."""
        cfg = self.cfg
        if cfg.lora.text_encoder:
            print("lora.text_encoder: the text encoder trains, so captions are encoded at every "
                  "step (no text cache for this run); the VAE cache is kept")
        cache = s.mirrors.get("data.cache_dir")
        where = dataclasses.replace(cfg.data, cache_dir=str(cache.local)) if cache else cfg.data
        encoded = data.encode_dataset(s.inputs.table, comps, where, self.progress,
                                      text_cache=not cfg.lora.text_encoder,
                                      on_write=cache.push if cache and s.machine.chief else None,
                                      masks=cfg.train.mask_background_weight is not None)
        if (m := encoded.mask_summary) is not None:
            share = (f", the garment {m['garment_share']:.0%} of their frame on average"
                     if m["garment_share"] is not None else "")
            print(f"loss masks (train.mask_background_weight="
                  f"{cfg.train.mask_background_weight:g}): {m['masked']} of {m['photos']} "
                  f"training photos masked{share}; {m['unmasked']} unmasked (weight 1 "
                  "everywhere: no plain background, or a mask of all garment)")
        return encoded

    def _lora(self, s: Setting, comps) -> tuple[dict, dict, int]:
        """LoRA on the U-Net (from lora.init_from when set) and, as a variant, on the text
        encoder; returns (every LoRA layer by checkpoint key, the text encoder's, the number of
        trainable parameters)."""
        cfg, t = self.cfg, self.cfg.train
        layers = lora.apply_lora(comps.diffusion_model, cfg.lora)
        if s.inputs.init_meta is not None:
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
                  f"checkpoints hold it, their raw weights go to {s.run.checkpoints / 'raw'}")
        trainable = lora.lora_parameter_count(layers, cfg.lora.rank,
                                              dora=cfg.lora.type == "dora")
        print(f"trainable LoRA parameters: {trainable:,} "
              f"({len(layers)} projections, rank {cfg.lora.rank})")
        return layers, te_layers, trainable

    # ---- 4. restore
    def restore(self, s: Setting, b: Built) -> None:
        if not self.resume:
            return
        state, run = b.state, s.run
        info = load_train_state(run.train_state, b.trainer, b.layers)
        state.step, state.best_val = info["step"], info["best_val"]
        state.elapsed = info["elapsed"]
        history = run.read_history(state.optimizer_step)
        state.history = history.to_dict("records") if history is not None else []
        print(f"resuming at step {state.optimizer_step} (epoch {state.epoch_progress:g})")
        if s.draws == LEGACY:
            print(f"{run.train_state} records no draws: the run began before {DRAWS!r} and "
                  "continues with its TensorFlow draws")
        if info.get("schedule") != cb.SCHEDULE:
            log.warning("%s was written before the learning-rate schedule counted optimizer steps "
                        "(warm-up and decay counted micro-batches with train.grad_accum > 1, and "
                        "the first warm-up step had rate 0); the rest of this run follows the "
                        "new schedule, and its val loss draws other noise", run.train_state)

    def record(self, s: Setting, b: Built, status: str, **extra) -> dict:
        """The run record's content: the config, the weights, the machine, what runs, ``status``."""
        cfg, m, t, source = self.cfg, s.machine, self.cfg.train, s.inputs.source
        jit_used = bool(b.trainer.jit_compile)  # Keras may still turn XLA off
        return {"config": cfg.to_dict(), "weights": source.to_dict(),
                "random_init": source.is_random, "backend": keras.config.backend(),
                "versions": machine_module().versions(),
                "machine": machine_module().describe(), "status": status,
                "trainable_parameters": b.trainable, "precision": m.precision,
                "jit_compile": jit_used, "jit_reason": m.jit_reason if jit_used == m.jit
                else f"{m.jit_reason}; Keras turned it off",
                "attention": cfg.model.attention, "lora_form": cfg.lora.form,
                "loss_scaling": m.precision == "mixed_float16", "replicas": m.replicas,
                "strategy": m.kind, "workers": m.workers,
                "steps_per_epoch": b.state.steps_per_epoch,
                "train_images": s.inputs.n_train, "val_images": s.inputs.n_val,
                "best_by": "val_loss" if s.inputs.n_val else "train_loss",
                "distinct_captions": int(s.inputs.table.caption.nunique()),
                "options": {k: getattr(t, k) for k in ("snr_gamma", "noise_offset",
                                                        "caption_dropout", "ema_decay",
                                                        "mask_background_weight",
                                                        "mask_normalize")},
                **({"masks": b.encoded.mask_summary} if b.encoded.mask_summary else {}),
                "text_encoder_lora": b.te_lora, "draws": s.draws, **extra}

    # ---- 5. fit
    def fit(self, s: Setting, b: Built, stop) -> None:
        """The fit segments; a stop request, a full disk or a lost worker ends them early."""
        cfg, t, state = self.cfg, self.cfg.train, b.state
        callbacks = self._callbacks(s, b, stop)
        val = data.val_dataset(b.encoded, t.batch_size, cfg.seed, t.val_repeats, s.draws)
        try:
            for initial, epochs, steps in fit_segments(state.step, state.steps_per_epoch,
                                                       state.end_step):
                if state.stop_reason:
                    break
                ds = data.train_dataset(b.encoded, data.Batches.of(cfg, s.draws),
                                        state.step,
                                        min(state.end_step, state.step + (epochs - initial) * steps))
                self._fit_segment(s, b, ds, val, (initial, epochs, steps), callbacks)
        except cb.StopRequested:
            self._interrupted(s, b, stop)
        except DiskFull as exc:
            s.writer.push()
            raise TrainingStopped(f"{exc}. {self._intact(s)} Free some space, then continue with "
                                  f"--resume.") from None

    def _fit_segment(self, s: Setting, b: Built, ds, val, segment, callbacks) -> None:
        initial, epochs, steps = segment
        if s.machine.kind != "multi_worker":
            b.trainer.fit(ds, epochs=epochs, initial_epoch=initial, steps_per_epoch=steps,
                             validation_data=val, callbacks=callbacks, verbose=self.verbose,
                             shuffle=False)
            return
        from fashion_sd.training import multiworker  # tf.distribute's, TensorFlow only

        try:  # Keras' fit cannot (see fashion_sd.training.multiworker)
            multiworker.fit(b.trainer, s.machine.strategy, ds, epochs=epochs,
                            initial_epoch=initial, steps_per_epoch=steps, validation_data=val,
                            callbacks=callbacks, verbose=self.verbose, chief=s.machine.chief)
        except multiworker.LOST_WORKER as exc:
            s.writer.push()
            saved = load_train_state_step(s.run.train_state)
            raise TrainingStopped(
                f"a worker of the cluster was lost at step {b.state.optimizer_step} "
                f"({str(exc).strip().splitlines()[0][:200]}). "
                + (f"The train state in {s.run.train_state} (step {saved}) is intact: "
                   if saved is not None else "No train state was written yet: ")
                + "restart every worker with the same command and --resume"
                + ("" if saved is not None else " removed")) from None

    def _callbacks(self, s: Setting, b: Built, stop) -> list:
        """Every worker counts steps and stops alike; only the chief writes (the writers)."""
        cfg, t, state, source = self.cfg, self.cfg.train, b.state, s.inputs.source
        metadata = {"base_weights": source.id, "random_init": str(source.is_random).lower(),
                    "caption_template": cfg.captions.template,
                    "resolution": str(cfg.data.resolution)}
        if cfg.lora.init_from:
            metadata["init_from"] = str(cfg.lora.init_from)
        else:  # how A started (B = 0): the config's lora.init, so a checkpoint says how to repeat it
            metadata["lora_init"] = cfg.lora.init
        if s.machine.jit:
            b.comps.diffusion_model.compile(jit_compile=True)  # XLA for the sampler's predicts
        sampler = Sampler(b.comps, local=s.machine.kind == "multi_worker")
        writers = [
            cb.Checkpointer(state, s.writer, b.layers, cfg, metadata, source.label),
            cb.SampleGrids(state, s.writer, sampler, t, source.label),
            *self._scoring(s, b, sampler),
            # EMA: val loss of the EMA weights, raw weights kept across fit segments.
            *([cb.EmaValidation(), cb.KeepRawWeights()] if t.ema_decay else []),
            *s.writer.tensorboard(),
            *([cb.AfterWrites(s.writer.push)] if s.writer.mirror else []),  # after writes
        ]
        return [cb.StepGuard(state, t.max_nonfinite, t.min_loss_scale, stop),
                *(writers if s.machine.chief else []), cb.StopWhenRequested(state)]

    def _scoring(self, s: Setting, b: Built, sampler) -> list:
        """``train.eval_every``: the chief scores; the other workers wait for it."""
        cfg, t = self.cfg, self.cfg.train
        if not t.eval_every or not s.machine.chief:
            return []

        print(f"evaluating every {t.eval_every} epoch(s) on {t.eval_images} {cfg.eval.split} "
              f"prompts -> {s.run.eval}")
        scorer = Scorer(cfg, Scope(num_images=t.eval_images, out=s.run.eval),
                        Parts(progress=self.progress))
        scorer.judge  # noqa: B018 - CLIP now: a missing download fails before the first step
        return [cb.EvalDuringTraining(b.state, scorer, sampler, t, s.inputs.source.id,
                                      s.inputs.source.label)]

    def _intact(self, s: Setting) -> str:
        saved = load_train_state_step(s.run.train_state)
        if saved is None:
            return "No train state was written yet."
        return (f"The last train state ({s.run.train_state}, step {saved}) and checkpoint "
                f"({s.run.last}) are intact.")

    def _interrupted(self, s: Setting, b: Built, stop) -> None:
        """After a stop request: the train state of this step is written (by the chief's
        Checkpointer); record it and say how to resume."""
        s.writer.write_record(self.record(s, b, "interrupted", step=b.state.optimizer_step,
                                             epoch=b.state.epoch_progress,
                                             stop_reason=stop.name))
        s.writer.push()
        where = (f"The train state of step {b.state.optimizer_step} is in "
                 f"{s.run.train_state}" if s.machine.chief else "The chief saved the train "
                 "state")
        raise TrainingInterrupted(
            f"{stop.name} at step {b.state.optimizer_step} (epoch "
            f"{b.state.epoch_progress:g}): stopped cleanly. {where}; continue with: fashion-sd "
            f"train --config {s.run.config} --resume", stop.exit_code)

    # ---- 6. finish
    def finish(self, s: Setting, b: Built) -> dict:
        t, state, trainer = self.cfg.train, b.state, b.trainer
        last = state.history[-1] if state.history else {}
        best = state.best_val if math.isfinite(state.best_val) else None
        summary = self.record(s, b, 
            "finished" if state.step >= b.state.total_steps else "stopped",
            stop_reason=state.stop_reason, step=state.optimizer_step, epoch=state.epoch_progress,
            final_loss=last.get("loss"), final_val_loss=last.get("val_loss"),
            best_val_loss=best if s.inputs.n_val else None,
            best_train_loss=None if s.inputs.n_val else best,
            skipped_steps=int(trainer.skipped_steps.numpy()),
            overflow_steps=int(trainer.overflow_steps.numpy()),
            seconds_this_session=round(time.time() - self.t_start, 1))
        s.writer.write_record(summary)
        if s.machine.kind == "multi_worker":
            from fashion_sd.training import multiworker

            multiworker.barrier(s.machine.strategy)
        if state.stop_reason is cb.StopReason.NONFINITE:
            raise TrainingStopped(
                f"stopped at step {state.optimizer_step}: {t.max_nonfinite} non-finite losses "
                f"in a row. The last checkpoint ({s.run.last}) is intact. Lower "
                "train.learning_rate, or use train.precision: float32.")
        if state.stop_reason is cb.StopReason.LOSS_SCALE:
            raise TrainingStopped(
                f"stopped at step {state.optimizer_step}: the float16 loss scale fell below "
                f"train.min_loss_scale={t.min_loss_scale:g} ({summary['overflow_steps']} "
                "overflow steps): gradients overflow float16 even unscaled, and smaller scales "
                f"would let them underflow silently. The last checkpoint ({s.run.last}) is "
                "intact. Use train.precision: mixed_bfloat16 (Ampere or newer) or float32, or "
                "lower train.learning_rate.")
        s.writer.write_cards()
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
