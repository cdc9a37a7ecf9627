"""What a run leaves behind, as Keras callbacks around ``fit``: step limits, stop requests,
checkpoints (by epoch and by step), history, plots and sample grids. They share one
:class:`RunState`, the run's position and bookkeeping. They decide when a file is written;
the run's :class:`fashion_sd.training.writer.RunWriter` writes it (how, in what order, and
only on the chief).
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import pandas as pd

from fashion_sd.config import Config, TrainConfig
from fashion_sd.rundir import BEST, LAST, SCORES_CSV, RunDir, checkpoint_name
from fashion_sd.training.draws import DRAWS
from fashion_sd.training.trainer import ema_weights, learning_rate, loss_scale, uses_ema
from fashion_sd.training.writer import RunWriter

# What the train state's schedule counts; states without it counted micro-batches.
SCHEDULE = "optimizer_steps"


class StopReason(str, enum.Enum):
    """Why a session of a run stopped before its last step; a string, so run.json and the
    summaries hold its value."""

    MAX_STEPS = "max_steps"  # train.max_steps before the epochs' end: resumable
    SIGNAL = "signal"  # SIGTERM / Ctrl-C: the step's train state is saved at once, resumable
    NONFINITE = "nonfinite"  # train.max_nonfinite non-finite losses in a row: a failure
    LOSS_SCALE = "loss_scale"  # float16's loss scale below train.min_loss_scale: a failure

    @property
    def failed(self) -> bool:
        """Nothing more is written after it (the last checkpoint stays the one to use)."""
        return self in (StopReason.NONFINITE, StopReason.LOSS_SCALE)

    def __str__(self) -> str:  # its value, as enum.StrEnum (Python 3.11+) would print it
        return self.value

    __format__ = str.__format__


@dataclass
class RunState:
    out: Path
    steps_per_epoch: int  # micro-batches per epoch
    grad_accum: int
    end_step: int  # micro-batch at which this run ends (epochs or train.max_steps)
    total_steps: int  # micro-batches of all epochs
    step: int = 0  # micro-batches done, over all sessions of the run
    best_val: float = math.inf
    elapsed: float = 0.0  # seconds of training in earlier sessions
    history: list[dict] = field(default_factory=list)
    stop_reason: StopReason | None = None
    monitor: str = "val_loss"  # what best.lora.safetensors is chosen by; "loss" without a val split
    session_start: float = field(default_factory=time.time)
    draws: str = DRAWS  # how its batches are drawn (fashion_sd.training.draws), kept on resume

    @property
    def run(self) -> RunDir:
        return RunDir(self.out)

    @property
    def failed(self) -> bool:
        return self.stop_reason is not None and self.stop_reason.failed

    @property
    def epoch_progress(self) -> float:
        return self.step / self.steps_per_epoch

    @property
    def optimizer_step(self) -> int:
        return self.step // self.grad_accum

    @property
    def epoch_complete(self) -> bool:
        return self.step % self.steps_per_epoch == 0

    @property
    def at_optimizer_step(self) -> bool:
        """Whether the last micro-batch completed an optimizer step (train.grad_accum)."""
        return self.step % self.grad_accum == 0

    @property
    def seconds(self) -> float:
        return self.elapsed + time.time() - self.session_start

    def info(self) -> dict:
        return {"step": self.step, "optimizer_step": self.optimizer_step,
                "epoch": self.epoch_progress, "best_val": self.best_val,
                "elapsed": self.seconds, "schedule": SCHEDULE, "draws": self.draws}


class StopRequested(Exception):
    """Raised out of ``fit`` once the step a stop request (SIGTERM, Ctrl-C) ended is saved: fit
    must not go on to its validation pass and epoch-end writes, which may take minutes."""


class StepGuard(keras.callbacks.Callback):
    """Counts steps; stops at the end step (train.max_steps), after ``max_nonfinite`` non-finite
    losses in a row, when the float16 loss scale falls below ``min_loss_scale``, or at the first
    optimizer step after a stop request (``stop``: :class:`fashion_sd.training.stopping.StopRequest`)."""

    def __init__(self, state: RunState, max_nonfinite: int, min_loss_scale: float = 1.0,
                 stop=None):
        super().__init__()
        self.state, self.max_nonfinite, self.min_loss_scale = state, max_nonfinite, min_loss_scale
        self.stop = stop

    def on_train_batch_end(self, batch, logs=None):
        st = self.state
        st.step += 1
        scale = loss_scale(self.model.optimizer)
        if self.stop is not None and self.stop.requested and st.at_optimizer_step:
            st.stop_reason = StopReason.SIGNAL
            self.model.stop_training = True
        elif int(self.model.nonfinite_streak.numpy()) >= self.max_nonfinite:
            st.stop_reason = StopReason.NONFINITE
            self.model.stop_training = True
        elif scale is not None and scale < self.min_loss_scale:
            st.stop_reason = StopReason.LOSS_SCALE
            self.model.stop_training = True
        elif st.step >= st.end_step:
            if st.end_step < st.total_steps:
                st.stop_reason = StopReason.MAX_STEPS
            self.model.stop_training = True


class StopWhenRequested(keras.callbacks.Callback):
    """Last in the list: after the step a stop request ended was saved (the chief's
    Checkpointer), leave ``fit`` at once (:class:`StopRequested`)."""

    def __init__(self, state: RunState):
        super().__init__()
        self.state = state

    def on_train_batch_end(self, batch, logs=None):
        if self.state.stop_reason is StopReason.SIGNAL:
            raise StopRequested


class Checkpointer(keras.callbacks.Callback):
    """When the run's files are written (how, in what order and by which process: the run's
    :class:`~fashion_sd.training.writer.RunWriter`).

    - At each epoch end (and at train.max_steps): the epoch's LoRA checkpoint (the last
      ``train.keep_last`` kept), ``best`` when the monitored loss improved (val loss; train loss
      without a val split), ``last``, then the history, its plot and the train state.
    - Every ``train.checkpoint_every_steps`` optimizer steps: a step-named LoRA checkpoint.
    - Every ``train.save_every_steps`` optimizer steps and at a stop request: the train state
      (``--resume`` continues there, mid-epoch).
    - After a failure (non-finite losses, a collapsed loss scale): nothing, so the previous
      checkpoint stays the one to use.
    """

    def __init__(self, state: RunState, writer: RunWriter, layers: dict, cfg: Config,
                 metadata: dict, label: str):
        super().__init__()
        self.state, self.writer = state, writer
        self.layers, self.spec, self.meta = layers, cfg.lora, metadata
        self.save_every = cfg.train.save_every_steps
        self.checkpoint_every = cfg.train.checkpoint_every_steps
        self.monitor = state.monitor
        self.keep_last, self.label = cfg.train.keep_last, label
        self.export = tuple(cfg.output.export)

    def _save_lora(self, name: str) -> Path:
        stamp = {"step": str(self.state.optimizer_step), "epoch": f"{self.state.epoch_progress:.4f}"}
        return self.writer.save_checkpoint(name, self.model, self.layers, self.spec,
                                           {**self.meta, **stamp}, self.export)

    def _every(self, n: int) -> bool:
        return bool(n) and self.state.at_optimizer_step and self.state.optimizer_step % n == 0

    def on_train_batch_end(self, batch, logs=None):
        st = self.state
        if st.failed or (st.epoch_complete and st.stop_reason is not StopReason.SIGNAL):
            return  # an epoch end writes everything in on_epoch_end
        if self._every(self.checkpoint_every):
            self._save_lora(RunDir.step_name(st.optimizer_step))
            self.writer.prune(st.run.step_checkpoints(), self.keep_last)
        if st.stop_reason is StopReason.SIGNAL or self._every(self.save_every):
            self.writer.save_train_state(self.model, self.layers, st.info())

    def on_epoch_end(self, epoch, logs=None):
        st, logs = self.state, logs or {}
        if st.failed:
            return
        if st.epoch_complete:
            self._save_lora(RunDir.epoch_name(epoch + 1))
            self.writer.prune(st.run.epoch_checkpoints(), self.keep_last)
        val = float(logs.get("val_loss", math.nan))
        watched = float(logs.get(self.monitor, math.nan))
        if math.isfinite(watched) and watched < st.best_val:
            st.best_val = watched
            self._save_lora(BEST)
        self._save_lora(LAST)
        st.history.append({
            "epoch": round(st.epoch_progress, 4), "step": st.optimizer_step,
            "loss": float(logs.get("loss", math.nan)), "val_loss": val,
            "lr": learning_rate(self.model.optimizer),
            "skipped_steps": int(self.model.skipped_steps.numpy()),
            "overflow_steps": int(self.model.overflow_steps.numpy()),
            "loss_scale": loss_scale(self.model.optimizer),
            "seconds": round(st.seconds, 1)})
        self.writer.end_epoch(st.history, self.label, self.model, self.layers, st.info())


class EmaValidation(keras.callbacks.Callback):
    """Val loss of what the checkpoints hold: the EMA weights for ``fit``'s validation pass
    (Keras calls on_test_begin/end around it), the raw ones back after.

    Not Keras' ``SwapEMAWeights``: it swaps in place by adding and subtracting (a + b - b), which
    rounds, so every validation would nudge the weights and a resumed run would drift by an ulp
    from an uninterrupted one. This swap copies.
    """

    def on_test_begin(self, logs=None):
        self._swap = ema_weights(self.model.optimizer, self.model.trainable_variables)
        self._swap.__enter__()

    def on_test_end(self, logs=None):
        self._swap.__exit__(None, None, None)


class KeepRawWeights(keras.callbacks.Callback):
    """Undo Keras' end-of-``fit`` EMA overwrite: with ``use_ema``, ``fit`` ends by replacing the
    weights with their average (``finalize_variable_values``), so a run fitted in segments would
    continue from the EMA. Their raw values at the last epoch end are put back."""

    def on_epoch_end(self, epoch, logs=None):
        self._raw = [v.numpy() for v in self.model.trainable_variables]

    def on_train_end(self, logs=None):
        for v, value in zip(self.model.trainable_variables, getattr(self, "_raw", ())):
            v.assign(value)


class SampleGrids(keras.callbacks.Callback):
    """When sample grids are drawn (:meth:`RunDir.samples_at_epoch`): every
    ``train.sample_every`` epochs and at the run's last step, fixed prompts and seeds through
    the model being trained, with the weights the checkpoints hold (EMA when on)."""

    def __init__(self, state: RunState, writer: RunWriter, sampler, train: TrainConfig,
                 label: str):
        super().__init__()
        self.state, self.writer, self.sampler, self.train = state, writer, sampler, train
        self.label = label

    def on_epoch_end(self, epoch, logs=None):
        st, t = self.state, self.train
        if st.failed or not t.sample_every:
            return
        last = st.step >= st.end_step or st.stop_reason is not None
        if st.epoch_complete and ((epoch + 1) % t.sample_every == 0 or last):
            path = st.run.samples_at_epoch(epoch + 1)
        elif last:
            path = st.run.samples_at_step(st.optimizer_step)
        else:
            return
        title = (f"epoch {st.epoch_progress:g}, step {st.optimizer_step}"
                 + (", EMA weights" if uses_ema(self.model.optimizer) else "")
                 + f" ({t.sample_steps} sampler steps)")
        with ema_weights(self.model.optimizer, self.model.trainable_variables):
            rows = [(p, self.sampler.generate(p, t.sample_seeds, t.sample_steps,
                                              t.sample_guidance)) for p in t.sample_prompts]
        self.writer.write_samples(path, rows, self.label, title, t.sample_seeds)


class EvalDuringTraining(keras.callbacks.Callback):
    """Every ``train.eval_every`` epochs, the epoch's checkpoint scored as ``evaluate_fid.py``
    would score it (same plan, same settings id, so a later evaluate_fid.py run skips it), with
    the weights the checkpoint holds (EMA when on), through the model being trained."""

    def __init__(self, state: RunState, scorer, sampler, train: TrainConfig, weights_id: str,
                 label: str):
        super().__init__()
        self.state, self.scorer, self.sampler, self.train = state, scorer, sampler, train
        self.weights_id, self.label = weights_id, label

    def on_epoch_end(self, epoch, logs=None):
        st = self.state
        if st.failed or not st.epoch_complete or (epoch + 1) % self.train.eval_every:
            return
        meta = {"epoch": epoch + 1, "step": st.optimizer_step}
        with ema_weights(self.model.optimizer, self.model.trainable_variables):
            row = self.scorer.score(self.sampler, checkpoint_name(st.run.epoch_checkpoint(epoch + 1)),
                                    meta, self.weights_id)
        self.scorer.record(row, self.label)
        print(f"epoch {epoch + 1}: KID {row['kid_mean']:.4g}, FID {row['fid']:.4g}"
              + (f", CLIP score {row['clip_score']:.1f}" if pd.notna(row["clip_score"]) else "")
              + f" -> {self.scorer.out / SCORES_CSV}")


class AfterWrites(keras.callbacks.Callback):
    """Calls ``then()`` after each epoch's files are written (last in the list) and at the end:
    a remote run folder's copy-out (:class:`fashion_sd.remote.Mirror`)."""

    def __init__(self, then):
        super().__init__()
        self.then = then

    def on_epoch_end(self, epoch, logs=None):
        self.then()

    def on_train_end(self, logs=None):
        self.then()

