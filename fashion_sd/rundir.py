"""A training run's folder: the one module that knows its file names.

    output.dir/
      config.yaml  run.json  history.csv  loss.png
      checkpoints/  epoch_XXX.lora.safetensors  best.lora.safetensors  last.lora.safetensors
                    train_state.safetensors  (+ exports: best.kohya.safetensors, ...)
                    best.README.md  best.samples.png  (a model card for the Hub, and last's)
                    raw/  (with train.ema_decay: the raw weights of each checkpoint)
      samples/  tensorboard/  eval/fid.csv (fid.md, fid.png)
      .fashion-sd.lock  (held by the live run: one run per folder, fashion_sd.runlock)

Its writer (:class:`fashion_sd.training.writer.RunWriter`, the only code that writes a run
folder), the evaluation's folder (:class:`EvalDir`) and the readers (the sweep, the app, the
evaluator's checkpoint lookup, the exporter) all go through :class:`RunDir` and
:func:`checkpoint_name`, so a file is named in exactly one place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path

import pandas as pd

from fashion_sd.files import atomic_path, atomic_write_text

CHECKPOINT_SUFFIX = ".lora.safetensors"
EPOCH_PREFIX = "epoch_"
BEST, LAST = "best", "last"
TRAIN_STATE = "train_state.safetensors"
# An evaluation's tables and plot, in a run's eval/ or any --out folder.
SCORES_CSV, SCORES_MD, SCORES_PLOT = "fid.csv", "fid.md", "fid.png"
SCORES_GRID = "real_vs_generated.png"  # one row per prompt: real, base, best, last
JUDGED_CSV = "scores.csv"  # per image, beside each model's images in eval/images/NAME/
GARMENT_CSV, GARMENT_MD = "garment.csv", "garment.md"  # evaluate --images's --out folder
DISTANCES_CSV, DISTANCES_MD = "distances.csv", "distances.md"  # evaluate --images --real
SWEEP_LOG = "sweep.log"  # a sweep run's training and evaluation output, in its run folder
OUTCOME = "sweep_outcome.json"  # a sweep run's outcome, in its trial's KerasTuner folder
GALLERY = "assistant"  # the app's generated images, under output.dir
STEP_PREFIX = "step_"  # step checkpoints (train.checkpoint_every_steps): step_000500.lora...
LOCK = ".fashion-sd.lock"
# A LoRA file's model card and the sample grid it shows, beside it (best.README.md,
# best.samples.png): a Hub repository has one README.md, and a folder holds several LoRAs.
CARD_SUFFIX, CARD_IMAGE_SUFFIX = ".README.md", ".samples.png"
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


def card_path(lora: str | Path) -> Path:
    """A LoRA file's model card, beside it: ``best.lora.safetensors`` -> ``best.README.md``,
    an export ``mine.safetensors`` -> ``mine.README.md``. Uploaded as a Hub repository's
    ``README.md``."""
    lora = Path(lora)
    return lora.with_name(checkpoint_name(lora) + CARD_SUFFIX)


def card_image_path(card: str | Path) -> Path:
    """The sample grid a card shows, copied beside it (``best.README.md`` ->
    ``best.samples.png``): a card and what it names upload as one flat folder."""
    card = Path(card)
    return card.with_name(card.name.removesuffix(CARD_SUFFIX) + CARD_IMAGE_SUFFIX)


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

    def card(self, name: str) -> Path:
        """``checkpoints/<name>.README.md``: the model card of checkpoint ``name``."""
        return card_path(self.checkpoint(name))

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

    def write_distances(self, table, summary: str) -> None:
        """``evaluate --images ... --real``: each folder's distances to the real one."""
        _write_csv(self.root / DISTANCES_CSV, table)
        atomic_write_text(self.root / DISTANCES_MD, summary)

    def write_summary(self, text: str) -> None:
        atomic_write_text(self.summary, text)


def _write_csv(path: Path, table) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")


class SweepDir:
    """A sweep's folder, its one reader and writer: ``results.csv``/``results.md``, the
    figures by setting, ``loss_curves.png``, each run's folder (``<run>/``, a :class:`RunDir`,
    written by its own training run) with the sweep's log of it (``<run>/sweep.log``), and the
    KerasTuner projects (``tuner_<kind>/trial_<id>/sweep_outcome.json``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def results(self) -> Path:
        return self.root / "results.csv"

    @property
    def summary(self) -> Path:
        return self.root / "results.md"

    def run(self, name: str) -> RunDir:
        return RunDir(self.root / name)

    def log(self, name: str) -> Path:
        """Run ``name``'s training and evaluation output, as the sweep saw it."""
        return self.root / name / SWEEP_LOG

    @contextlib.contextmanager
    def appending(self, name: str, command: str):
        """The log of run ``name``, open for a child process's output, headed by ``command``."""
        log = self.log(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as fh:
            fh.write(f"\n$ {command}\n")
            fh.flush()
            yield fh

    def project(self, kind: str) -> Path:
        """KerasTuner's project folder for a ``kind`` search (it writes its own files there)."""
        return self.root / f"tuner_{kind}"

    def outcome(self, kind: str, trial_id: str) -> Path:
        return self.project(kind) / f"trial_{trial_id}" / OUTCOME

    def write_outcome(self, kind: str, trial_id: str, outcome: dict) -> None:
        atomic_write_text(self.outcome(kind, trial_id), json.dumps(outcome, default=str))

    def read_outcome(self, kind: str, trial_id: str) -> dict | None:
        try:
            return json.loads(self.outcome(kind, trial_id).read_text())
        except (OSError, ValueError):
            return None

    def write_results(self, table, summary: str, label: str, histories: dict) -> None:
        """The results table and its summary, the figures by setting and every run's losses."""
        from fashion_sd import plots  # noqa: PLC0415 - matplotlib only when a plot is drawn

        self.root.mkdir(parents=True, exist_ok=True)
        _write_csv(self.results, table)
        atomic_write_text(self.summary, summary)
        plots.sweep_figures(table, self.root, label)
        if histories:
            plots.all_loss_curves(histories, self.root / "loss_curves.png", label)
