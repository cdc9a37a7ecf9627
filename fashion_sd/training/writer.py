"""The one writer of a training run's folder (:class:`RunWriter`): the run's record and config,
its LoRA checkpoints (with their raw EMA twins and exports) and their pruning, the train state,
the history and its plot, the sample grids, TensorBoard's folder and, at the run's end, the model
cards of ``best`` and ``last`` (:mod:`fashion_sd.model_card`). The callbacks decide when
something is written; how, in what order and by which process is decided here.

Two rules live here and nowhere else:

* **the chief writes**: in a multi-worker run every other process holds a writer whose methods
  do nothing, so a callback never asks which worker it runs on;
* **the train state last**: ``--resume`` trusts the train state, so it is written after the
  checkpoints and the history it points at (:meth:`RunWriter.end_epoch`).

Paths come from :class:`fashion_sd.rundir.RunDir`, the one module that names the files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import keras
import pandas as pd

from fashion_sd import model_card, plots
from fashion_sd.files import atomic_path, atomic_write_text
from fashion_sd.interop.lora_formats import FORMATS, export_lora
from fashion_sd.rundir import HISTORY_COLUMNS, RunDir, checkpoint_name
from fashion_sd.runlock import RunLock
from fashion_sd.sd import lora
from fashion_sd.training.trainer import ema_weights, save_train_state, uses_ema

log = logging.getLogger(__name__)


class RunWriter:
    """The one writer of a run folder, for one process of one run: it knows whether this process
    writes (the chief of a multi-worker run; every other process is a no-op writer) and where
    a remote output.dir's local mirror is copied out to (``mirror``: a
    :class:`fashion_sd.remote.Mirror`, or None)."""

    def __init__(self, run: RunDir, chief: bool = True, mirror=None):
        self.run, self.chief, self.mirror = run, chief, mirror

    def push(self) -> None:
        """Copy what was written out to the remote output.dir, if there is one."""
        if self.mirror is not None and self.chief:
            self.mirror.push()

    def lock(self):
        """The folder's lock (:class:`fashion_sd.runlock.RunLock`), held by the chief only."""
        return RunLock(self.run.lock_file, self.run.root) if self.chief else contextlib.nullcontext()

    # ---- the run's description
    def clear(self) -> None:
        """``--fresh``: remove an earlier run's outputs (never other files in the folder)."""
        if not self.chief:
            return
        for name in RunDir.OUTPUTS:
            p = self.run.root / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        self.push()

    def save_config(self, cfg) -> None:
        if self.chief:
            self.run.root.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run.config)
            self.push()

    def write_record(self, record: dict) -> None:
        """``run.json``: the run's config, weights, machine and status."""
        if self.chief:
            atomic_write_text(self.run.run_json, json.dumps(record, indent=2, default=str) + "\n")
            self.push()

    # ---- checkpoints
    def save_checkpoint(self, name: str, model, layers: dict, spec, metadata: dict,
                        export: tuple = ()) -> Path:
        """``checkpoints/<name>.lora.safetensors`` from ``layers``, with ``metadata``; with an EMA
        optimizer it holds the EMA and the raw weights go to ``checkpoints/raw/``; ``export``
        formats are written beside it (``best.kohya.safetensors``)."""
        path = self.run.checkpoint(name)
        if not self.chief:
            return path
        if uses_ema(model.optimizer):
            lora.save_lora(self.run.raw_checkpoint(name), layers, spec, **metadata, weights="raw")
            with ema_weights(model.optimizer, model.trainable_variables):
                lora.save_lora(path, layers, spec, **metadata, weights="ema")
        else:
            lora.save_lora(path, layers, spec, **metadata)
        for fmt, target in zip(export, self.run.exports(path, export)):
            export_lora(path, fmt, target)
        return path

    def prune(self, kept: list[Path], keep_last: int) -> None:
        """The oldest of ``kept`` (epoch or step checkpoints) beyond ``keep_last``, with their
        raw weights and exports in every format."""
        if not self.chief:
            return
        for old in kept[: max(0, len(kept) - keep_last)]:
            old.unlink()
            self.run.raw_checkpoint(checkpoint_name(old)).unlink(missing_ok=True)
            for export in self.run.exports(old, FORMATS):
                export.unlink(missing_ok=True)

    def save_train_state(self, model, layers: dict, info: dict) -> None:
        """What ``--resume`` continues from, mid-epoch (a step save or a stop request)."""
        if self.chief:
            save_train_state(self.run.train_state, model, layers, info)
            self.push()

    def end_epoch(self, history: list[dict], label: str, model, layers: dict, info: dict) -> None:
        """After an epoch's checkpoints: ``history.csv``, ``loss.png``, then the train state.

        Last, because ``--resume`` reads the history up to the train state's step: a crash
        before the train state resumes at the previous one and writes this epoch's row again;
        with the train state first, a crash after it lost the row for good."""
        if not self.chief:
            return
        with atomic_path(self.run.history) as tmp:
            pd.DataFrame(history, columns=HISTORY_COLUMNS).to_csv(tmp, index=False,
                                                                  lineterminator="\n")
        plots.loss_curves(pd.DataFrame(history), self.run.loss_plot, label)
        save_train_state(self.run.train_state, model, layers, info)

    # ---- pictures and logs
    def write_samples(self, path: Path, rows, label: str, title: str, seeds) -> None:
        """A sample grid (one row per prompt, a column per seed) at ``path`` under samples/."""
        if self.chief:
            plots.sample_grid(rows, path, label, title, [f"seed {s}" for s in seeds])

    def write_cards(self, formats=FORMATS) -> list[Path]:
        """The model cards of ``best`` and ``last`` (``checkpoints/best.README.md``, the sample
        grid copied beside it), naming their exports in ``formats``: what a user uploads to the
        Hub with the LoRA. Written at the run's end, when every figure they show is on disk."""
        if not self.chief:
            return []
        try:
            written = model_card.write_cards(self.run, formats)
        except Exception as exc:  # noqa: BLE001 - a card describes a saved run: never fail it
            log.warning("the model cards of %s were not written: %s: %s", self.run.checkpoints,
                        type(exc).__name__, exc)
            return []
        self.push()
        return written

    def tensorboard(self) -> list:
        """Keras' TensorBoard callback into ``tensorboard/``, on TensorFlow and the chief only:
        it writes with ``tf.summary`` (history.csv and loss.png hold the same figures on every
        backend)."""
        if not self.chief or keras.config.backend() != "tensorflow":
            return []
        return [keras.callbacks.TensorBoard(str(self.run.tensorboard))]
