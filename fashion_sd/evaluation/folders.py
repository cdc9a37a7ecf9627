"""Folders of images compared directly, as clean-fid's ``compute_fid(dir1, dir2)`` does: every
distance of the scores table (FID and KID, CMMD, FD-DINOv2, precision/recall/density/coverage,
the standard errors) between each folder of generated images (this project's, diffusers', any
tool's) and one folder of real ones. No Stable Diffusion model and no captions are needed.

    fashion-sd evaluate --images GEN_DIR [GEN_DIR ...] --real REAL_DIR --out DIR

Both sides go through the same loader (:func:`fashion_sd.images.load_image` at
``data.resolution``: padded to a square on the image's own background, resized), so a folder
compared with itself scores 0 whatever its sizes. One row per generated folder in
``distances.csv``, with ``distances.md``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from fashion_sd.evaluation.distance_columns import DistanceColumns, Networks, RealSet, load_dinov2
from fashion_sd.evaluation.distances import frechet_distance_of_features
from fashion_sd.evaluation.fid import cached_stats, kid, kid_subset_size, stats_key
from fashion_sd.images import EXTENSIONS, header_problem, load_image
from fashion_sd.precision import dtype_policy
from fashion_sd.preflight import InputError
from fashion_sd.rundir import EvalDir

COLUMNS = ["images", "n_generated", "n_real", "fid", "fid_se", "kid_mean", "kid_std",
           "kid_subset_size", "cmmd", "cmmd_se", "fd_dinov2", "fd_dinov2_se", "precision",
           "recall", "density", "coverage", "inception_precision", "inception_recall",
           "inception_density", "inception_coverage", "backend", "protocol", "comparable",
           "clip_model", "dinov2_model", "size", "notes"]


def image_files(folder: Path, flag: str) -> list[Path]:
    """The images in ``folder`` (by suffix, sorted), each header checked: a folder with fewer
    than two, or with an image that cannot be decoded, is refused before any network loads."""
    files = sorted(p for p in folder.iterdir() if p.suffix in EXTENSIONS)
    bad = [(p, why) for p in files if (why := header_problem(p))]
    if bad:
        raise InputError(f"{flag} {folder}: {len(bad)} image(s) cannot be read, e.g. "
                         + "; ".join(f"{p.name}: {why}" for p, why in bad[:3]))
    if len(files) < 2:
        raise InputError(f"{flag} {folder}: {len(files)} image(s) (.jpg, .jpeg, .png); "
                         "a distance needs at least 2 in each folder")
    return files


def load_networks(cfg) -> Networks:
    """Inception (``eval.backend``), CLIP (``eval.clip``) and DINOv2 (``eval.dinov2``), in
    float32; a CLIP or DINOv2 that ``auto`` cannot find is off, with the reason."""
    from fashion_sd.evaluation.clip import load_clip  # noqa: PLC0415 - heavy: after the checks
    from fashion_sd.evaluation.inception import load_extractor  # noqa: PLC0415

    with dtype_policy("float32"):
        extractor = load_extractor(cfg.eval.backend, cfg.eval.inception_weights,
                                   cfg.eval.protocol)
        clip, clip_note = load_clip(cfg.eval.clip, cfg.eval.clip_preset, cfg.seed)
        dino, dino_note = load_dinov2(cfg.eval.dinov2)
    return Networks(extractor, clip, clip_note, dino, dino_note)


def compare_folders(cfg, generated: list[Path], real: Path, out: Path, networks: Networks,
                    progress=None) -> pd.DataFrame:
    """One row per folder of ``generated`` against the ``real`` folder: written to ``out``
    (``distances.csv``, ``distances.md``) and returned."""
    size = cfg.data.resolution
    real_files = image_files(real, "--real")
    sets = {folder: image_files(folder, "--images") for folder in generated}
    ex = networks.extractor

    def load(path):
        return load_image(path, size)

    with dtype_policy("float32"):
        real_stats = cached_stats(Path(cfg.data.cache_dir),
                                  stats_key(real_files, ex.name, ex.preprocessing, size=size),
                                  lambda: _features(ex, real_files, load, progress))
        real_set = RealSet(real_files, load, Path(cfg.data.cache_dir), size,
                           real_stats["features"])
        columns = DistanceColumns(real_set, networks, cfg.eval.bootstrap, cfg.seed)
        rows = [_row(cfg, folder, files, real_stats, columns, networks, load, progress)
                for folder, files in sets.items()]
    table = pd.DataFrame(rows, columns=COLUMNS)
    EvalDir(out).write_distances(table, summary(table, real))
    return table


def _features(extractor, files, load, progress) -> np.ndarray:
    batch = extractor.batch_size
    starts = range(0, len(files), batch)
    steps = progress(starts, "Inception features", len(starts)) if progress else starts
    return np.concatenate([extractor(np.stack([load(p) for p in files[s: s + batch]]))
                           for s in steps])


def _row(cfg, folder, files, real_stats, columns, networks, load, progress) -> dict:
    images = [load(p) for p in files]
    ex = networks.extractor
    features = _features(ex, files, load, progress)
    m = kid_subset_size(len(features), len(real_stats["features"]), cfg.eval.kid_subset_size)
    k_mean, k_std = kid(features, real_stats["features"], cfg.eval.kid_subsets, m, seed=cfg.seed)

    return {"images": str(folder), "n_generated": len(files), "n_real": len(columns.real.paths),
            "fid": frechet_distance_of_features(real_stats["features"], features),
            "kid_mean": k_mean, "kid_std": k_std, "kid_subset_size": m,
            **columns.row(images, features), "backend": ex.name, "protocol": ex.protocol,
            "comparable": ex.comparable,
            "clip_model": networks.clip.label if networks.clip is not None else None,
            "size": cfg.data.resolution}


def _num(value, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else \
        fmt.format(value)


def summary(table: pd.DataFrame, real: Path) -> str:
    """``distances.md``: one line per folder, then what the numbers rest on."""
    lines = [f"# Distances to {real}", "",
             "| images | n | FID ± se | KID (x1e3) | CMMD ± se | FD-DINOv2 ± se | "
             "precision / recall / density / coverage (DINOv2) | the same (Inception) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for _, r in table.iterrows():
        def pm(col, fmt="{:.4g}"):
            v, se = _num(r[col], fmt), _num(r[f"{col}_se"], "{:.2g}")
            return f"{v} ± {se}" if v and se else v

        prdc = [" / ".join(_num(r[p + c], "{:.2f}") for c in
                           ("precision", "recall", "density", "coverage"))
                if _num(r[p + "precision"], "{}") else "" for p in ("", "inception_")]
        lines.append(f"| {r.images} | {r.n_generated} | {pm('fid')} | "
                     f"{_num(r.kid_mean * 1e3, '{:.4g}')} | {pm('cmmd', '{:.3f}')} | "
                     f"{pm('fd_dinov2')} | {prdc[0]} | {prdc[1]} |")
    first = table.iloc[0]
    dino = first.dinov2_model if isinstance(first.dinov2_model, str) else "off"
    notes = [f"{int(first.n_real)} real images; every image loaded at {first['size']} px (padded "
             f"to a square on its own background). Inception: {first.backend}, protocol "
             f"{first.protocol}"
             + ("" if str(first.comparable) in ("True", "true") else
                " (NOT the published FID network: these FIDs compare only with each other)")
             + f". CMMD: {first.clip_model if isinstance(first.clip_model, str) else 'off'}. "
             f"DINOv2: {dino}.",
             "± is the bootstrap standard error over resampled images (eval.bootstrap)."]
    notes += sorted({part for text in table.notes.dropna().astype(str)
                     for part in text.split("; ") if part})
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"
