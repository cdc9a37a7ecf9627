"""The distances a scores row carries beside FID and KID, on the same images: CMMD on the CLIP
judge's image embeddings, FD-DINOv2 and precision/recall/density/coverage on DINOv2 features,
PRDC on Inception's too, FID's, FD-DINOv2's and CMMD's bootstrap standard errors, and the notes
each earns at its sample size (numerics: :mod:`fashion_sd.evaluation.distances`).

A metric whose network is not there (``eval.clip: none``, ``eval.dinov2: auto`` offline) is a
column left empty with the reason in ``notes``, never a made-up number. Each real set's
embeddings are computed once and cached as Inception's statistics are
(:func:`fashion_sd.evaluation.fid.cached_stats`, keyed by the images, the network and its
preprocessing).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fashion_sd.evaluation import distances as d
from fashion_sd.evaluation.fid import cached_stats, stats_key

log = logging.getLogger(__name__)

COLUMNS = ["fid_se", "cmmd", "cmmd_se", "fd_dinov2", "fd_dinov2_se", "precision", "recall",
           "density", "coverage", "inception_precision", "inception_recall",
           "inception_density", "inception_coverage", "dinov2_model", "notes"]
PRDC = ("precision", "recall", "density", "coverage")
LABELS = {"fid": "FID", "cmmd": "CMMD", "fd_dinov2": "FD-DINOv2"}


def weights_digest(model) -> str:
    """A short id of a network's weights (its first and last arrays): a model's name is its
    folder's, which two folders, or new weights in one, may share; the real set's cached
    embeddings must not be reused for other weights."""
    if model is None or not getattr(model, "weights", None):
        return "-"
    import keras  # noqa: PLC0415 - the networks are Keras models

    h = hashlib.sha256()
    for w in (model.weights[0], model.weights[-1]):
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    return h.hexdigest()[:12]


def load_dinov2(spec: str):
    """(the DINOv2 network ``eval.dinov2`` names, or None; why it is off). ``auto`` falls back to
    off with the reason where the default weights cannot be had; a named folder that cannot be
    used is an error (the message says what is missing)."""
    if spec == "none":
        return None, "eval.dinov2: none"
    from fashion_sd.evaluation import dinov2  # noqa: PLC0415 - keras-hub only when asked for

    if spec != "auto":
        return dinov2.load(spec), ""
    try:
        return dinov2.load(dinov2.DEFAULT), ""
    except dinov2.DinoV2Unavailable as exc:
        log.warning("FD-DINOv2 and PRDC on DINOv2 are off: %s", exc)
        return None, f"eval.dinov2: auto: {exc}"


@dataclass
class Networks:
    """What the images go through: Inception, CLIP for CMMD, DINOv2 for FD-DINOv2 and PRDC, each
    with why it is off where it is (tests pass small ones)."""

    extractor: object  # Inception (evaluation/inception.py)
    clip: object = None  # a ClipModel (evaluation/clip.py)
    clip_note: str = ""
    dinov2: object = None  # a DinoV2 (evaluation/dinov2.py)
    dinov2_note: str = ""


@dataclass
class RealSet:
    """The real images a scoring compares with: their paths (the cache key), how to load them
    (the same loader as the generated images' size), where caches go, and their Inception
    features (already computed for FID)."""

    paths: list
    load: object  # path -> uint8 HWC
    cache_dir: Path
    size: int | None  # the size images are loaded at (part of the cache key)
    inception: np.ndarray
    _images: list | None = field(default=None, repr=False)

    def images(self) -> list:
        if self._images is None:
            self._images = [self.load(p) for p in self.paths]
        return self._images

    def embed(self, name: str, preprocessing: str, compute) -> np.ndarray:
        """The real images through one network (``compute(images)``), once, cached."""
        key = stats_key(self.paths, name, preprocessing, size=self.size)
        return cached_stats(self.cache_dir, key, lambda: compute(self.images()))["features"]


class DistanceColumns:
    """One scoring's distances beside FID and KID, against one real set."""

    def __init__(self, real: RealSet, networks: Networks, n_boot: int = 20, seed: int = 0):
        clip, dino = networks.clip, networks.dinov2
        self.real, self.clip, self.dino = real, clip, dino
        self.off = {"cmmd": f"CMMD off: {networks.clip_note or 'no CLIP judge'}"
                    if clip is None else "",
                    "dinov2": f"FD-DINOv2 off: {networks.dinov2_note}" if dino is None else ""}
        self.n_boot, self.seed = n_boot, seed
        self._real_clip = self._real_dino = None

    @property
    def real_clip(self) -> np.ndarray:
        if self._real_clip is None:
            name = f"clip:{self.clip.label}:{weights_digest(getattr(self.clip, 'model', None))}"
            self._real_clip = self.real.embed(name, "clip-image-embeddings",
                                              self.clip.embed_images)
        return self._real_clip

    @property
    def real_dino(self) -> np.ndarray:
        if self._real_dino is None:
            from fashion_sd.evaluation import dinov2  # noqa: PLC0415

            name = f"dinov2:{self.dino.name}:{weights_digest(self.dino.backbone)}"
            self._real_dino = self.real.embed(
                name, self.dino.preprocessing,
                lambda images: dinov2.features(images, self.dino))
        return self._real_dino

    def row(self, images, inception: np.ndarray) -> dict:
        """The columns for one model's generated ``images`` (uint8) and their Inception
        features."""
        real_inc, n_real, n_gen = self.real.inception, len(self.real.paths), len(images)
        out: dict = {c: math.nan for c in COLUMNS}
        notes = [n for n in self.off.values() if n]
        out["fid_se"] = self._se(d.frechet_distance_of_features, real_inc, inception)
        out.update(self._prdc(real_inc, inception, "inception_", notes))
        if self.clip is not None:
            gen = self.clip.embed_images(images)
            out["cmmd"] = d.cmmd(self.real_clip, gen)
            out["cmmd_se"] = self._se(d.cmmd, self.real_clip, gen)
        if self.dino is not None:
            from fashion_sd.evaluation import dinov2  # noqa: PLC0415

            gen = dinov2.features(images, self.dino)
            out["fd_dinov2"] = d.frechet_distance_of_features(self.real_dino, gen)
            out["fd_dinov2_se"] = self._se(d.frechet_distance_of_features, self.real_dino, gen)
            out.update(self._prdc(self.real_dino, gen, "", notes))
            out["dinov2_model"] = self.dino.label
        computed = ["fid"] + (["cmmd"] if self.clip is not None else []) + (
            ["fd_dinov2"] if self.dino is not None else [])
        notes += [f"{LABELS[m]}: {note}" for m in computed
                  if (note := d.reliability_note(m, n_real, n_gen))]
        out["notes"] = "; ".join(dict.fromkeys(notes))
        return out

    def _se(self, metric, real, generated) -> float:
        """The bootstrap standard error (``eval.bootstrap`` resamples), or NaN without one."""
        if not self.n_boot:
            return math.nan
        return d.bootstrap_interval(metric, real, generated, self.n_boot, self.seed).std

    def _prdc(self, real, generated, prefix: str, notes: list) -> dict:
        """Precision, recall, density, coverage (k = 5), or none where a set has at most k
        images; the note on their size goes to ``notes`` once."""
        note = d.reliability_note("prdc", len(real), len(generated))
        if note:
            notes.append(f"PRDC: {note}")
        if min(len(real), len(generated)) <= d.PRDC_NEAREST_K:
            return {}
        scores = d.prdc(real, generated, d.PRDC_NEAREST_K)
        return {prefix + k: scores[k] for k in PRDC}
