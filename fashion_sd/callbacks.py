"""What a run leaves behind, as Keras callbacks around ``fit``: step limits, checkpoints, history,
plots and sample grids. They share one :class:`RunState`, the run's position and bookkeeping.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import pandas as pd

from fashion_sd import lora, plots
from fashion_sd.config import Config, TrainConfig
from fashion_sd.files import atomic_path
from fashion_sd.rundir import BEST, LAST, RunDir, checkpoint_name
from fashion_sd.trainer import (
    ema_weights,
    learning_rate,
    loss_scale,
    save_train_state,
    uses_ema,
)

# skipped_steps: non-finite losses or gradients (never applied); overflow_steps: float16 steps
# the loss-scale optimizer skipped; loss_scale: its scale (empty without float16).
# What the train state's schedule counts; states without it counted micro-batches.
SCHEDULE = "optimizer_steps"
HISTORY_COLUMNS = ["epoch", "step", "loss", "val_loss", "lr", "skipped_steps", "overflow_steps",
                   "loss_scale", "seconds"]


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
    stop_reason: str | None = None  # "max_steps" | "nonfinite" | "loss_scale" | None
    session_start: float = field(default_factory=time.time)

    @property
    def run(self) -> RunDir:
        return RunDir(self.out)

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
    def seconds(self) -> float:
        return self.elapsed + time.time() - self.session_start

    def info(self) -> dict:
        return {"step": self.step, "optimizer_step": self.optimizer_step,
                "epoch": self.epoch_progress, "best_val": self.best_val,
                "elapsed": self.seconds, "schedule": SCHEDULE}


FAILURES = ("nonfinite", "loss_scale")  # stop reasons after which nothing more is written


class StepGuard(keras.callbacks.Callback):
    """Counts steps; stops at the end step (train.max_steps), after ``max_nonfinite`` non-finite
    losses in a row, or when the float16 loss scale falls below ``min_loss_scale``."""

    def __init__(self, state: RunState, max_nonfinite: int, min_loss_scale: float = 1.0):
        super().__init__()
        self.state, self.max_nonfinite, self.min_loss_scale = state, max_nonfinite, min_loss_scale

    def on_train_batch_end(self, batch, logs=None):
        st = self.state
        st.step += 1
        scale = loss_scale(self.model.optimizer)
        if int(self.model.nonfinite_streak.numpy()) >= self.max_nonfinite:
            st.stop_reason = "nonfinite"
            self.model.stop_training = True
        elif scale is not None and scale < self.min_loss_scale:
            st.stop_reason = "loss_scale"
            self.model.stop_training = True
        elif st.step >= st.end_step:
            if st.end_step < st.total_steps:
                st.stop_reason = "max_steps"
            self.model.stop_training = True


class Checkpointer(keras.callbacks.Callback):
    """At each epoch end (and at train.max_steps): LoRA checkpoints, train state, history, plot.

    An epoch checkpoint (the last ``keep_last`` kept), ``best`` by val loss (train loss when
    there is no val split: ``monitor``), ``last`` (always the
    newest), and the train state for --resume (names: :class:`RunDir`); each written
    atomically, the train state last so it never points past what is on disk. After a run of
    non-finite steps nothing is written: the previous checkpoint stays as it was. ``export``
    formats (``output.export``) are written beside each checkpoint, e.g. ``best.kohya.safetensors``.
    """

    def __init__(self, state: RunState, layers: dict, cfg: Config, metadata: dict, label: str,
                 monitor: str = "val_loss"):
        super().__init__()
        self.state, self.layers, self.spec, self.meta = state, layers, cfg.lora, metadata
        self.monitor = monitor  # "loss" (train loss) when the val split is empty
        self.keep_last, self.label = cfg.train.keep_last, label
        self.export = tuple(cfg.output.export)

    def _save_lora(self, name: str) -> Path:
        stamp = {"step": str(self.state.optimizer_step), "epoch": f"{self.state.epoch_progress:.4f}"}
        run, optimizer = self.state.run, self.model.optimizer
        if uses_ema(optimizer):  # the checkpoint holds the EMA; the raw weights go beside it
            lora.save_lora(run.raw_checkpoint(name), self.layers, self.spec, **self.meta, **stamp,
                           weights="raw")
            with ema_weights(optimizer, self.model.trainable_variables):
                path = lora.save_lora(run.checkpoint(name), self.layers, self.spec, **self.meta,
                                      **stamp, weights="ema")
        else:
            path = lora.save_lora(run.checkpoint(name), self.layers, self.spec, **self.meta,
                                  **stamp)
        if self.export:
            from fashion_sd.interop.lora_formats import export_lora

            for fmt, target in zip(self.export, self.state.run.exports(path, self.export)):
                export_lora(path, fmt, target)
        return path

    def on_epoch_end(self, epoch, logs=None):
        st, logs = self.state, logs or {}
        if st.stop_reason in FAILURES:
            return
        if st.epoch_complete:
            self._save_lora(RunDir.epoch_name(epoch + 1))
            self._prune()
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
        save_train_state(st.run.train_state, self.model, self.layers, st.info())
        write_history(st.history, st.run.history)
        plots.loss_curves(pd.DataFrame(st.history), st.run.loss_plot, self.label)

    def _prune(self):
        from fashion_sd.interop.lora_formats import FORMATS

        run = self.state.run
        kept = run.epoch_checkpoints()
        for old in kept[: max(0, len(kept) - self.keep_last)]:
            old.unlink()
            run.raw_checkpoint(checkpoint_name(old)).unlink(missing_ok=True)
            for export in run.exports(old, FORMATS):  # its exports go with it
                export.unlink(missing_ok=True)


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
    """Sample grids (:meth:`RunDir.samples_at_epoch`): fixed prompts and seeds through the model
    being trained."""

    def __init__(self, state: RunState, sampler, train: TrainConfig, label: str):
        super().__init__()
        self.state, self.sampler, self.train, self.label = state, sampler, train, label

    def on_epoch_end(self, epoch, logs=None):
        st, t = self.state, self.train
        if st.stop_reason in FAILURES or not t.sample_every:
            return
        last = st.step >= st.end_step or st.stop_reason is not None
        if st.epoch_complete and ((epoch + 1) % t.sample_every == 0 or last):
            path = st.run.samples_at_epoch(epoch + 1)
        elif last:
            path = st.run.samples_at_step(st.optimizer_step)
        else:
            return
        with ema_weights(self.model.optimizer, self.model.trainable_variables):
            render_samples(self.sampler, t.sample_prompts, t.sample_seeds, t.sample_steps,
                           t.sample_guidance, path, self.label,
                           f"epoch {st.epoch_progress:g}, step {st.optimizer_step}"
                           + (", EMA weights" if uses_ema(self.model.optimizer) else ""))


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
        if st.stop_reason in FAILURES or not st.epoch_complete or (epoch + 1) % self.train.eval_every:
            return
        meta = {"epoch": epoch + 1, "step": st.optimizer_step}
        with ema_weights(self.model.optimizer, self.model.trainable_variables):
            row = self.scorer.score(self.sampler, checkpoint_name(st.run.epoch_checkpoint(epoch + 1)),
                                    meta, self.weights_id)
        self.scorer.record(self.scorer.previous(), row, self.label)
        print(f"epoch {epoch + 1}: KID {row['kid_mean']:.4g}, FID {row['fid']:.4g}"
              + (f", CLIP score {row['clip_score']:.1f}" if pd.notna(row["clip_score"]) else "")
              + f" -> {self.scorer.out / 'fid.csv'}")


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


def render_samples(sampler, prompts, seeds, steps, guidance, path, label, title) -> Path:
    rows = [(p, sampler.generate(p, seeds, steps, guidance)) for p in prompts]
    return plots.sample_grid(rows, path, label, f"{title} ({steps} sampler steps)",
                             [f"seed {s}" for s in seeds])


def write_history(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(rows, columns=HISTORY_COLUMNS).to_csv(tmp, index=False, lineterminator="\n")


def read_history(path: Path, up_to_step: int) -> list[dict]:
    """Rows of an earlier session, without any written after the train state it resumes from."""
    if not path.is_file():
        return []
    df = pd.read_csv(path)
    return df[df.step <= up_to_step].to_dict("records")
