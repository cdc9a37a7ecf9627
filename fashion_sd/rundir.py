"""A training run's folder: the one module that knows its file names.

    output.dir/
      config.yaml  run.json  history.csv  loss.png
      checkpoints/  epoch_XXX.lora.safetensors  best.lora.safetensors  last.lora.safetensors
                    train_state.safetensors  (+ exports: best.kohya.safetensors, ...)
                    raw/  (with train.ema_decay: the raw weights of each checkpoint)
      samples/  tensorboard/  eval/fid.csv (fid.md, fid.png)

Writers (the trainer's callbacks, the evaluator) and readers (the sweep, the app, the
evaluator's checkpoint lookup, the exporter) all go through :class:`RunDir` and
:func:`checkpoint_name`, so a file is named in exactly one place.
"""

from __future__ import annotations

import json
from pathlib import Path

CHECKPOINT_SUFFIX = ".lora.safetensors"
EPOCH_PREFIX = "epoch_"
BEST, LAST = "best", "last"
TRAIN_STATE = "train_state.safetensors"
# An evaluation's tables and plot, in a run's eval/ or any --out folder.
SCORES_CSV, SCORES_MD, SCORES_PLOT = "fid.csv", "fid.md", "fid.png"
SCORES_GRID = "real_vs_generated.png"  # one row per prompt: real, base, best, last
JUDGED_CSV = "scores.csv"  # per image, beside each model's images in eval/images/NAME/


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
    """What an evaluation of a checkpoints folder scores: its epoch checkpoints, else ``last``."""
    folder = Path(folder)
    found = sorted(folder.glob(f"{EPOCH_PREFIX}*{CHECKPOINT_SUFFIX}"))
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
        return self.samples / f"step_{step:06d}.png"

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
        """What an evaluation of the run scores: its epoch checkpoints, else ``last``."""
        return scored_in(self.checkpoints)

    # ---- reading
    def read_history(self):
        """``history.csv`` as a DataFrame, or None when there is none (yet) or it is unreadable."""
        return _read_csv(self.history)

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
    import pandas as pd

    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (OSError, ValueError):
        return None
