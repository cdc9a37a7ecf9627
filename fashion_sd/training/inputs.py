"""Every check of a training run that needs no model, and none of Keras: the run folder, the
captions and their images, ``lora.targets`` against SD 1.x's static table, ``lora.init_from``,
the weights, ``--resume``'s config and draws. ``fashion-sd train`` runs them before TensorFlow or
JAX loads, so a bad input is refused in about the time Python takes to start
(``benchmarks/bad_flags.py``); :func:`fashion_sd.training.run.train` runs them itself when it
is called otherwise.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from fashion_sd import backends, images, preflight, remote
from fashion_sd.catalogue.captions import read_captions
from fashion_sd.clip_spec import check_dinov2_spec, check_spec
from fashion_sd.config import Config
from fashion_sd.errors import BackendError, FashionSDError
from fashion_sd.evaluation.evaluate import make_plan
from fashion_sd.rundir import RunDir
from fashion_sd.safetensors_file import safetensors_header
from fashion_sd.sd import lora_file, weight_files
from fashion_sd.training.draws import DRAWS, LEGACY

log = logging.getLogger(__name__)

# What may change between a run and its --resume; anything else would make a different run.
RESUMABLE_CHANGES = ("train.epochs", "train.max_steps", "train.keep_last", "train.max_nonfinite",
                     "train.sample_every", "train.sample_steps", "train.sample_guidance",
                     "train.sample_seeds", "train.sample_prompts", "train.jit_compile",
                     "train.min_loss_scale", "train.strategy", "train.save_every_steps",
                     "train.checkpoint_every_steps", "model.attention", "lora.form",
                     "data.cache_dir", "model.cache_dir", "output.dir", "output.export")


class TrainingError(FashionSDError, RuntimeError):
    """A run that cannot start or had to stop; the message says why and what to do."""


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
    # A key added since the run began (lora.type, the masks, eval.dinov2, ...) ran as its
    # default, which leaves the run as it was.
    for key, value in _flat(Config().to_dict()).items():
        old.setdefault(key, value)
    new = _flat(cfg.to_dict())
    diffs = [f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES]
    if diffs:
        raise TrainingError(f"--resume with a config that differs from {saved}:\n  "
                            + "\n  ".join(diffs) + "\nresume with the run's own config, or start a "
                            "new run in another output.dir")


def _load_yaml(path: Path) -> dict:

    return yaml.safe_load(path.read_text())


@dataclass
class Inputs:
    """What the checks before any heavy work found: the captions and where the weights are."""

    table: object  # the captions table
    n_train: int
    n_val: int  # 0: best.lora.safetensors is chosen by train loss
    source: weight_files.WeightsSource
    init_meta: dict | None  # lora.init_from's metadata (checked), when the run starts from it


def _check_run_folder(run: RunDir, cfg: Config, resume: bool, fresh: bool, chief: bool) -> None:
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
            safetensors_header(run.train_state)
        except (ValueError, OSError) as exc:
            raise TrainingError(f"--resume: {run.train_state} is damaged ({exc}); resume cannot "
                                f"use it. Start over with --fresh, or train from a checkpoint: "
                                f"--set lora.init_from={run.last}") from None
        check_resume_config(run.config, cfg)


def _check_images(cfg: Config, table) -> None:
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
    if not remote.is_remote(paths[0] if paths else ""):  # headers only: no pixel decoded
        bad = [(p, why) for p in paths if (why := images.header_problem(p))]
        if bad:
            raise TrainingError(f"{cfg.data.captions}: {len(bad)} image(s) cannot be used, e.g. "
                                f"{bad[0][0]}: {bad[0][1]}; replace or drop them and rebuild "
                                "the captions")
    if cfg.train.mask_background_weight is not None and "mask" in table.columns:
        given = [(i, m) for i, m in enumerate(table["mask"].tolist()) if m]
        bad = [(i, m, why) for i, m in given if (why := "not found" if not remote.is_file(m)
                                                 else images.header_problem(m))]
        if bad:
            i, m, why = bad[0]
            raise TrainingError(f"{cfg.data.captions}: {len(bad)} mask image(s) of the mask "
                                f"column cannot be used, e.g. line {i + 2}: {m}: {why}; fix the "
                                "paths (white: the garment), or leave a row's mask empty")
    if warning := images.upscale_warning(images.upscale_factors(table.image_path,
                                                                 cfg.data.resolution),
                                         cfg.data.resolution):
        log.warning("%s", warning)


def check_inputs(cfg: Config, run: RunDir, resume: bool, fresh: bool = False,
                 chief: bool = True) -> Inputs:
    """Every check that needs no model: the run folder, the captions and images, lora.init_from,
    the weights. Raises TrainingError (or WeightsError) before anything heavy happens.

    Other workers than the chief of a multi-worker run write nothing to output.dir; they read
    the chief's train state from it when resuming (output.dir is shared: a network folder).
    """
    backend = backends.name()
    if cfg.lora.text_encoder and backend != "tensorflow":
        # Its step (the text encoder inside the loss, two AdamW groups) has no JAX-vs-TensorFlow
        # comparison yet, as the U-Net's has (tests/step_case.py): refused until it has one.
        raise BackendError(f"lora.text_encoder: true on Keras' {backend} backend: "
                           "the text encoder's LoRA is proven on the tensorflow backend only; "
                           "run it with KERAS_BACKEND=tensorflow, or set lora.text_encoder: false")
    try:  # against SD 1.x's static table of projections, before the U-Net is built
        lora_file.check_targets(lora_file.unet_layer_names(), cfg.lora.targets)
    except lora_file.LoraError as exc:
        raise TrainingError(str(exc)) from None
    _check_run_folder(run, cfg, resume, fresh, chief)
    table = read_captions(cfg.data.captions)
    n_train = int((table.split == "train").sum())
    t = cfg.train
    if n_train < t.batch_size:
        raise TrainingError(f"{cfg.data.captions}: {n_train} training rows cannot fill one batch of "
                            f"train.batch_size={t.batch_size}")
    batches = t.epochs * (n_train // t.batch_size)
    if batches < t.grad_accum:  # Keras would apply no update at all, and the run "finish"
        raise TrainingError(
            f"train.grad_accum={t.grad_accum}: the run has {batches} batch(es) of "
            f"train.batch_size={t.batch_size} ({n_train} training rows, {t.epochs} epoch(s)), "
            f"fewer than one optimizer step accumulates; lower train.grad_accum or "
            "train.batch_size, or raise train.epochs")
    _check_images(cfg, table)
    init_meta = None
    if cfg.lora.init_from and not resume:  # checked now; loaded once the LoRA layers exist
        try:
            init_meta = lora_file.check_init_from(cfg.lora.init_from, cfg.lora.rank, cfg.lora.alpha,
                                                  cfg.lora.type)
        except lora_file.LoraError as exc:
            raise TrainingError(str(exc)) from None
    if cfg.train.eval_every:
        if backend != "tensorflow":
            raise BackendError(f"train.eval_every: {cfg.train.eval_every}: evaluation (FID through "
                               "TF-Hub's Inception) needs Keras' tensorflow "
                               "backend; set train.eval_every: 0 on "
                               f"{backend} and run fashion-sd evaluate on "
                               "TensorFlow afterwards")
        make_plan(cfg, cfg.eval.split, cfg.train.eval_images)  # the split it scores is not empty
        check_spec(cfg.eval.clip)
        check_dinov2_spec(cfg.eval.dinov2)
    source = weight_files.resolve_weights(cfg.model.weights, cache_dir=cfg.model.cache_dir, seed=cfg.seed)
    return Inputs(table, n_train, int((table.split == "val").sum()), source, init_meta)


def resume_draws(train_state: Path, backend: str) -> str:
    """The draws (fashion_sd.training.draws) a resumed run continues with: the version its train
    state records, or LEGACY when it records none (written before the record: TensorFlow's
    stateless draws), which only Keras' tensorflow backend can continue bit for bit."""
    info = json.loads(safetensors_header(train_state)[1].get("info", "{}"))
    version = info.get("draws", LEGACY)
    if version not in (DRAWS, LEGACY):
        raise TrainingError(f"--resume: {train_state} records draws {version!r}, which this "
                            f"fashion-sd does not know (it draws {DRAWS!r}, or {LEGACY!r} for "
                            "older runs); resume with the fashion-sd that wrote it, or start "
                            "over with --fresh")
    if version == LEGACY and backend != "tensorflow":
        raise TrainingError(
            f"--resume: {train_state} was written before fashion-sd drew its noise and "
            f"timesteps with NumPy's Philox ({DRAWS!r}): its run draws them with TensorFlow's "
            f"stateless ops, which Keras' {backend} backend cannot, so the resumed run would "
            "not be the run it continues. Resume it on TensorFlow (KERAS_BACKEND=tensorflow, "
            f"make setup: .venv), or start it over on {backend} with --fresh (or in a new "
            "output.dir)")
    return version


def early_checks(cfg: Config, resume: bool, fresh: bool) -> Inputs | None:
    """:func:`check_inputs` before Keras loads, where the run folder is known without the
    machine: a local ``output.dir`` and one process. A run of several processes (tf.distribute's
    multi_worker, JAX hosts joined through ``KERAS_DISTRIBUTION_*``: which one writes is known
    once the cluster is read) and a bucket ``output.dir`` (checked in its local mirror) are
    checked by :func:`~fashion_sd.training.run.train` itself (None here)."""
    cluster = any(k.startswith("KERAS_DISTRIBUTION_") for k in os.environ)
    if cfg.train.strategy == "multi_worker" or cluster or remote.is_remote(cfg.output.dir):
        return None
    return check_inputs(cfg, RunDir(cfg.output.dir), resume, fresh)

