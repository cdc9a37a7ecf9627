"""FID and KID for the base model and each LoRA checkpoint against a split's real images.

For every model: generate one image per caption of the split (cycled up to ``eval.num_images``)
with fixed seeds, extract Inception features, and score them against the split's real images,
whose statistics are computed once and cached. Results accumulate in a scores table (:data:`fashion_sd.rundir.SCORES_CSV`); a checkpoint
already scored with the same settings is skipped unless ``force``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fashion_sd import plots, rundir
from fashion_sd.captions import read_captions
from fashion_sd.config import Config
from fashion_sd.errors import FashionSDError
from fashion_sd.files import atomic_path, atomic_write_text
from fashion_sd.rundir import RunDir

log = logging.getLogger(__name__)

COLUMNS = ["checkpoint", "epoch", "step", "fid", "kid_mean", "kid_std", "n_real", "n_generated",
           "backend", "comparable", "weights_source", "settings"]
BASE = "base"


class EvaluationError(FashionSDError, ValueError):
    """Inputs the evaluation cannot use; the message says what to do."""


def find_checkpoints(spec: str | Path) -> list[Path]:
    """A run's checkpoints folder (its epoch checkpoints, else ``last``), a file or a glob."""
    spec = str(spec)
    path = Path(spec)
    if path.is_dir():
        found = rundir.scored_in(path)
    elif path.is_file():
        found = [path]
    else:
        found = sorted(Path(p) for p in glob.glob(spec))
    found = [p for p in found if rundir.is_lora_file(p)]
    if not found:
        raise EvaluationError(f"--checkpoints {spec}: no {rundir.CHECKPOINT_SUFFIX} checkpoint found")
    return found


@dataclass
class Plan:
    prompts: list[str]  # one per generated image
    seeds: list[int]
    real_paths: list[str]
    settings: dict

    @property
    def settings_id(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]


def make_plan(cfg: Config, split: str, num_images: int | None, backend_id: str = "") -> Plan:
    table = read_captions(cfg.data.captions)
    rows = table[table.split == split]
    if rows.empty:
        raise EvaluationError(f"{cfg.data.captions}: the {split!r} split is empty; build captions "
                              "with a non-zero captions.split fraction for it")
    if (rows.image_path == "").any():
        raise EvaluationError(f"{cfg.data.captions}: rows without image_path; rebuild with --images")
    n = num_images or cfg.eval.num_images or len(rows)
    captions = rows.caption.tolist()
    prompts = [captions[i % len(captions)] for i in range(n)]
    seeds = [cfg.seed + i for i in range(n)]
    settings = {"split": split, "n": n, "steps": cfg.eval.steps, "guidance": cfg.eval.guidance,
                "resolution": cfg.data.resolution, "seed": cfg.seed, "backend": backend_id,
                "weights": cfg.model.weights, "captions": hashlib.sha256(
                    "\n".join(captions).encode()).hexdigest()[:12]}
    return Plan(prompts, seeds, rows.image_path.tolist(), settings)


def generate_for(sampler, plan: Plan, batch_size: int, folder: Path | None, progress=None):
    """The plan's images, batched by prompt; saved as PNGs in ``folder`` when given."""
    images: list[np.ndarray | None] = [None] * len(plan.prompts)
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(plan.prompts):
        by_prompt.setdefault(p, []).append(i)
    jobs = [(p, idx[s: s + batch_size]) for p, idx in by_prompt.items()
            for s in range(0, len(idx), batch_size)]
    for prompt, idx in (progress(jobs, "generating", len(jobs)) if progress else jobs):
        out = sampler.generate(prompt, [plan.seeds[i] for i in idx],
                               plan.settings["steps"], plan.settings["guidance"])
        for i, img in zip(idx, out):
            images[i] = img
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(images):
            with atomic_path(folder / f"{i:04d}_s{plan.seeds[i]}.png") as tmp:
                Image.fromarray(img).save(tmp, format="PNG")
    return np.stack(images)


def score(gen_feats: np.ndarray, real: dict, cfg: Config) -> dict:
    from fashion_sd.metrics import feature_stats, frechet_distance, kid

    mu, sigma = feature_stats(gen_feats)
    fid = frechet_distance(mu, sigma, real["mu"], real["sigma"])
    k_mean, k_std = kid(gen_feats, real["features"], cfg.eval.kid_subsets, cfg.eval.kid_subset_size,
                        seed=cfg.seed)
    return {"fid": fid, "kid_mean": k_mean, "kid_std": k_std}


def write_tables(df: pd.DataFrame, out: Path, label: str) -> None:
    """The scores table, its markdown (best row marked) and plot (FID and KID against epoch)."""
    with atomic_path(out / rundir.SCORES_CSV) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")
    scored = df[df.checkpoint != BASE]
    best = scored.fid.idxmin() if len(scored) else None
    comparable = bool(df.comparable.all())
    lines = ["| checkpoint | epoch | FID | KID (x1e3) | n real | n generated |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for i, r in df.iterrows():
        mark = " **best**" if i == best else ""
        epoch = "" if pd.isna(r.epoch) else f"{r.epoch:g}"
        lines.append(f"| {r.checkpoint}{mark} | {epoch} | {r.fid:.4g} | "
                     f"{1e3 * r.kid_mean:.4g} ± {1e3 * r.kid_std:.2g} | {r.n_real} | {r.n_generated} |")
    notes = [f"\nBackend: {df.backend.iloc[0]}. Weights: {df.weights_source.iloc[0]}."]
    if not comparable:
        notes.append("**NOT COMPARABLE**: features from an untrained Inception network; these "
                     "numbers say nothing about image quality and cannot be compared with "
                     "published FIDs.")
    if int(df.n_real.min()) < 2048 or int(df.n_generated.min()) < 2048:
        notes.append("Fewer than 2048 images: FID is biased upwards at this size; compare KID, "
                     "which is unbiased.")
    atomic_write_text(out / rundir.SCORES_MD, "# FID / KID per checkpoint\n\n" + "\n".join(lines)
                      + "\n" + "\n\n".join(notes) + "\n")
    plots.metric_curves(df, out / rundir.SCORES_PLOT, label if comparable else
                        f"NOT COMPARABLE (untrained Inception). {label}")


def _key_name(model) -> str:
    """A model's name in the scores table: ``base`` or the checkpoint's name."""
    return model if model == BASE else rundir.checkpoint_name(model)


def evaluate(cfg: Config, checkpoints=None, include_base: bool = False, num_images: int | None = None,
             split: str | None = None, force: bool = False, extractor=None, progress=None,
             out: str | Path | None = None, build=None) -> pd.DataFrame:
    """Score the base model and/or checkpoints; returns the whole scores table.

    ``extractor`` and ``build(source, resolution)`` replace the Inception network and the
    Stable Diffusion components (tests pass small ones).
    """
    from fashion_sd import lora
    from fashion_sd.generate import build_sampler, resolve_inference_weights
    from fashion_sd.metrics import (
        cached_stats,
        load_extractor,
        real_image_features,
        stats_key,
        warn_if_biased,
    )

    split = split or cfg.eval.split
    paths = find_checkpoints(checkpoints) if checkpoints else []
    if not paths and not include_base:
        raise EvaluationError("nothing to score: give --checkpoints DIR|GLOB and/or --include-base")
    for p in paths:  # a bad file fails here, before any work (headers only)
        lora.lora_metadata(p)
    out = Path(out) if out else RunDir(cfg.output.dir).eval
    plan = make_plan(cfg, split, num_images)  # the captions and split, before Inception loads
    if extractor is None:
        extractor = load_extractor(cfg.eval.backend, cfg.eval.inception_weights)
    plan.settings["backend"] = f"{extractor.name}/{extractor.preprocessing}"

    scores = out / rundir.SCORES_CSV
    previous = pd.read_csv(scores) if scores.is_file() else pd.DataFrame(columns=COLUMNS)
    done = set(zip(previous.checkpoint, previous.settings)) if not force else set()
    wanted = ([BASE] if include_base else []) + paths
    todo = [m for m in wanted if (_key_name(m), plan.settings_id) not in done]
    redo = {(_key_name(m), plan.settings_id) for m in todo}  # rows replaced by this call
    table = previous[[key not in redo for key in zip(previous.checkpoint, previous.settings)]]
    if not todo:
        print(f"every model is already scored with these settings in {scores} "
              "(--force recomputes)")
        return table.reset_index(drop=True)

    key = stats_key(plan.real_paths, extractor.name, extractor.preprocessing)
    real = cached_stats(Path(cfg.data.cache_dir), key,
                        lambda: real_image_features(extractor, plan.real_paths, progress=progress))
    warn_if_biased(len(plan.real_paths), len(plan.prompts))

    source = resolve_inference_weights(cfg.model.weights, cfg.model.cache_dir, cfg.seed)
    sampler = build_sampler(source, cfg.data.resolution, cfg.seed, build)
    comps = sampler.comps
    swap = lora.LoraSwap()
    rows = []
    for model in todo:
        name = _key_name(model)
        swap.reset()  # back to the base weights, then fold this LoRA in
        meta = {}
        if model != BASE:
            deltas, meta = lora.lora_deltas(model, comps.diffusion_model,
                                            text_encoder=comps.text_encoder)
            swap.apply(deltas)
        print(f"scoring {name} ({len(plan.prompts)} images, {plan.settings['steps']} steps)")
        images = generate_for(sampler, plan, cfg.eval.batch_size, out / "images" / name, progress)
        scores = score(extractor(images), real, cfg)
        rows.append({"checkpoint": name, "epoch": float(meta["epoch"]) if "epoch" in meta else math.nan,
                     "step": float(meta["step"]) if "step" in meta else math.nan, **scores,
                     "n_real": len(plan.real_paths), "n_generated": len(images),
                     "backend": extractor.name, "comparable": extractor.comparable,
                     "weights_source": source.id, "settings": plan.settings_id})
        table = pd.concat([table, pd.DataFrame(rows[-1:], columns=COLUMNS)], ignore_index=True)
        table = _ordered(table)
        write_tables(table, out, source.label)  # after each model: a crash loses one model's work
    write_grid(plan, table, out, source.label)
    return table


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    base = table.checkpoint == BASE
    return pd.concat([table[base], table[~base].sort_values(["epoch", "checkpoint"])],
                     ignore_index=True)


def write_grid(plan: Plan, table: pd.DataFrame, out: Path, label: str, rows: int = 4) -> Path | None:
    """Real images beside the generated ones for the first prompts: base, best and last model."""
    names = []
    if (table.checkpoint == BASE).any():
        names.append(BASE)
    scored = table[table.checkpoint != BASE]
    if len(scored):
        names += list(dict.fromkeys([scored.loc[scored.fid.idxmin(), "checkpoint"],
                                     scored.checkpoint.iloc[-1]]))
    grid_rows = []
    for i in range(min(rows, len(plan.prompts))):
        cells = [np.asarray(Image.open(plan.real_paths[i % len(plan.real_paths)]).convert("RGB"))]
        for name in names:
            path = out / "images" / name / f"{i:04d}_s{plan.seeds[i]}.png"
            if path.is_file():
                cells.append(np.asarray(Image.open(path).convert("RGB")))
        grid_rows.append((plan.prompts[i], cells))
    if not grid_rows:
        return None
    return plots.sample_grid(grid_rows, out / "real_vs_generated.png", label,
                             "real (test split) vs generated", ["real", *names])
