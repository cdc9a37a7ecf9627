"""A training run's folder: the one module that knows its file names.

    output.dir/
      config.yaml  run.json  history.csv  loss.png
      checkpoints/  epoch_XXX.lora.safetensors  best.lora.safetensors  last.lora.safetensors
                    train_state.safetensors  (+ exports: best.kohya.safetensors, ...)
                    raw/  (with train.ema_decay: the raw weights of each checkpoint)
      samples/  tensorboard/  eval/fid.csv (fid.md, fid.png)
      .fashion-sd.lock  (held by the live run: one run per folder, fashion_sd.runlock)

Writers (the trainer's callbacks, the evaluator) and readers (the sweep, the app, the
evaluator's checkpoint lookup, the exporter) all go through :class:`RunDir` and
:func:`checkpoint_name`, so a file is named in exactly one place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
from pathlib import Path

import pandas as pd

from fashion_sd.files import atomic_path, atomic_write_text
from fashion_sd.runlock import RunLock

CHECKPOINT_SUFFIX = ".lora.safetensors"
EPOCH_PREFIX = "epoch_"
BEST, LAST = "best", "last"
TRAIN_STATE = "train_state.safetensors"
# An evaluation's tables and plot, in a run's eval/ or any --out folder.
SCORES_CSV, SCORES_MD, SCORES_PLOT = "fid.csv", "fid.md", "fid.png"
SCORES_GRID = "real_vs_generated.png"  # one row per prompt: real, base, best, last
JUDGED_CSV = "scores.csv"  # per image, beside each model's images in eval/images/NAME/
GARMENT_CSV, GARMENT_MD = "garment.csv", "garment.md"  # evaluate --images's --out folder
SWEEP_LOG = "sweep.log"  # a sweep run's training and evaluation output, in its run folder
GALLERY = "assistant"  # the app's generated images, under output.dir
STEP_PREFIX = "step_"  # step checkpoints (train.checkpoint_every_steps): step_000500.lora...
LOCK = ".fashion-sd.lock"
SCORES_LOCK = ".scores.lock"  # an eval folder's, see EvalDir.scores_locked
# history.csv's columns. skipped_steps: non-finite losses or gradients (never applied);
# overflow_steps: float16 steps the loss-scale optimizer skipped; loss_scale: its scale (empty
# without float16).
HISTORY_COLUMNS = ["epoch", "step", "loss", "val_loss", "lr", "skipped_steps", "overflow_steps",
                   "loss_scale", "seconds"]


def checkpoint_name(path: str | Path) -> str:
    """A checkpoint's name: its file name without ``.lora.safetensors`` (or ``.safetensors``)."""
    name = Path(path).name
    if name.endswith(CHECKPOINT_SUFFIX):
        return name[: -len(CHECKPOINT_SUFFIX)]
    return name.removesuffix(".safetensors")


def is_checkpoint(path: str | Path) -> bool:
    """A LoRA checkpoint file (not the train state, not an export in another format)."""
    return Path(path).name.endswith(CHECKPOINT_SUFFIX)


def is_lora_file(path: str | Path) -> bool:
    """A safetensors file that may hold a LoRA (any format), i.e. not a run's train state."""
    name = Path(path).name
    return name.endswith(".safetensors") and name != TRAIN_STATE


def export_path(checkpoint: str | Path, fmt: str) -> Path:
    """Where a checkpoint's export to ``fmt`` goes, beside it: ``best.kohya.safetensors``."""
    checkpoint = Path(checkpoint)
    stem = checkpoint_name(checkpoint) if is_checkpoint(checkpoint) else checkpoint.stem
    return checkpoint.with_name(f"{stem}.{fmt}.safetensors")


def scored_in(folder: str | Path) -> list[Path]:
    """What an evaluation of a checkpoints folder scores: its epoch and step checkpoints, else
    ``last``."""
    folder = Path(folder)
    found = sorted(folder.glob(f"{EPOCH_PREFIX}*{CHECKPOINT_SUFFIX}"))
    found += sorted(folder.glob(f"{STEP_PREFIX}*{CHECKPOINT_SUFFIX}"))
    last = folder / f"{LAST}{CHECKPOINT_SUFFIX}"
    if not found and last.is_file():
        found = [last]
    return found


class RunDir:
    """Paths, checkpoint naming and listing, history, scores and status of one run folder."""

    # What `train.py --fresh` removes: a run's own outputs, never other files in output.dir.
    OUTPUTS = ("checkpoints", "samples", "tensorboard", "eval", "history.csv", "loss.png",
               "run.json", "config.yaml")

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ---- paths
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def train_state(self) -> Path:
        return self.checkpoints / TRAIN_STATE

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def scores(self) -> Path:
        return self.eval / SCORES_CSV

    def samples_at_epoch(self, epoch: int) -> Path:
        return self.samples / f"{self.epoch_name(epoch)}.png"

    def samples_at_step(self, step: int) -> Path:
        return self.samples / f"{self.step_name(step)}.png"

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK

    # ---- checkpoints
    def checkpoint(self, name: str) -> Path:
        """``checkpoints/<name>.lora.safetensors``; ``name`` is e.g. ``best`` or ``epoch_003``."""
        return self.checkpoints / f"{name}{CHECKPOINT_SUFFIX}"

    def raw_checkpoint(self, name: str) -> Path:
        """With ``train.ema_decay`` the checkpoints hold the EMA weights; the raw (last
        optimizer step's) weights of each go to ``checkpoints/raw/<name>.lora.safetensors``."""
        return self.checkpoints / "raw" / f"{name}{CHECKPOINT_SUFFIX}"

    @staticmethod
    def epoch_name(epoch: int) -> str:
        return f"{EPOCH_PREFIX}{epoch:03d}"

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoint(self.epoch_name(epoch))

    @staticmethod
    def step_name(step: int) -> str:
        return f"{STEP_PREFIX}{step:06d}"

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoint(self.step_name(step))

    def step_checkpoints(self) -> list[Path]:
        """The step checkpoints on disk (``train.checkpoint_every_steps``), oldest first."""
        return sorted(self.checkpoints.glob(f"{STEP_PREFIX}*{CHECKPOINT_SUFFIX}"))

    @property
    def best(self) -> Path:
        return self.checkpoint(BEST)

    @property
    def last(self) -> Path:
        return self.checkpoint(LAST)

    def epoch_checkpoints(self) -> list[Path]:
        """The epoch checkpoints on disk, oldest first."""
        return sorted(self.checkpoints.glob(f"{EPOCH_PREFIX}*{CHECKPOINT_SUFFIX}"))

    def exports(self, checkpoint: str | Path, formats) -> list[Path]:
        """The export files of ``checkpoint`` in ``formats`` (whether or not they exist)."""
        return [export_path(checkpoint, fmt) for fmt in formats]

    def all_checkpoints(self) -> list[Path]:
        """Every LoRA checkpoint on disk (epochs, best, last), by name."""
        return sorted(self.checkpoints.glob(f"*{CHECKPOINT_SUFFIX}"))

    def scored_checkpoints(self) -> list[Path]:
        """What an evaluation of the run scores: its epoch and step checkpoints, else ``last``."""
        return scored_in(self.checkpoints)

    # ---- reading
    def read_history(self, up_to_step: int | None = None):
        """``history.csv`` as a DataFrame, or None when there is none (yet) or it is unreadable;
        ``up_to_step``: without the rows written after the train state a run resumes from."""
        df = _read_csv(self.history)
        if df is None or up_to_step is None:
            return df
        return df[df.step <= up_to_step]

    def read_scores(self):
        """``eval/fid.csv`` as a DataFrame, or None."""
        return _read_csv(self.scores)

    def read_record(self) -> dict | None:
        """``run.json``, or None when there is none or it is unreadable."""
        try:
            return json.loads(self.run_json.read_text())
        except (OSError, ValueError):
            return None

    def status(self) -> str | None:
        """``running``, ``finished``, ``stopped`` (as run.json says), or None (never started)."""
        record = self.read_record()
        return record.get("status") if record else None


def _read_csv(path: Path):

    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (OSError, ValueError):
        return None


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

    def write_history(self, rows: list[dict]) -> None:
        if self.chief:

            with atomic_path(self.run.history) as tmp:
                pd.DataFrame(rows, columns=HISTORY_COLUMNS).to_csv(tmp, index=False,
                                                                     lineterminator="\n")


class EvalDir:
    """An evaluation's folder (a run's ``eval/`` or any ``--out``): the one reader and writer of
    everything in it: its scores table (read and rewritten under its lock), summary, plot and
    real-vs-generated grid, each model's images and their per-image judgements, and
    ``evaluate --images``'s garment table and summary."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def scores(self) -> Path:
        return self.root / SCORES_CSV

    @property
    def summary(self) -> Path:
        return self.root / SCORES_MD

    @property
    def plot(self) -> Path:
        return self.root / SCORES_PLOT

    @property
    def grid(self) -> Path:
        return self.root / SCORES_GRID

    def images(self, model: str) -> Path:
        """Where a model's generated images go: ``images/<model>/``."""
        return self.root / "images" / model

    def image(self, model: str, index: int, seed: int) -> Path:
        return self.images(model) / f"{index:04d}_s{seed}.png"

    def read_scores(self):
        """The scores table, or None when there is none (yet) or it is unreadable."""
        return _read_csv(self.scores)

    @contextlib.contextmanager
    def scores_locked(self):
        """Held while the scores table is read, changed and written back: evaluations into one
        folder at once (two commands, or one beside a run's ``train.eval_every``) then each
        keep their rows. A blocking ``flock``, held for a write only, so neither waits long; the
        kernel frees it when a process dies."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / SCORES_LOCK, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def write_scores(self, table) -> None:
        _write_csv(self.scores, table)

    def write_judged(self, model: str, table) -> None:
        """A model's per-image judgements, beside its images."""
        _write_csv(self.images(model) / JUDGED_CSV, table)

    def write_image(self, model: str, index: int, seed: int, image) -> Path:
        """One generated image (uint8 HWC) of ``model``, as a PNG."""
        from PIL import Image  # noqa: PLC0415 - a folder's names need no imaging library

        path = self.image(model, index, seed)
        with atomic_path(path) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        return path

    def write_plot(self, table, label: str) -> Path:
        """The scores against epoch (``fid.png``)."""
        from fashion_sd import plots  # noqa: PLC0415 - matplotlib only when a plot is drawn

        return plots.metric_curves(table, self.plot, label)

    def write_grid(self, rows, label: str, title: str, names: list[str]) -> Path:
        """``real_vs_generated.png``: one row per prompt, a column per model."""
        from fashion_sd import plots  # noqa: PLC0415

        return plots.sample_grid(rows, self.grid, label, title, names)

    def write_garment(self, table, summary: str) -> None:
        """``evaluate --images``: the per-image judgements and their summary."""
        _write_csv(self.root / GARMENT_CSV, table)
        atomic_write_text(self.root / GARMENT_MD, summary)

    def write_summary(self, text: str) -> None:
        atomic_write_text(self.summary, text)


def _write_csv(path: Path, table) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
