"""FID, KID and the garment metrics for the base model and each LoRA checkpoint.

For every model: generate one image per caption of the split (cycled up to ``eval.num_images``)
with fixed seeds; score them against the split's real images (Inception features; the real
images pass through the training loader first, so both sets have the training size) and judge
each image against its prompt (CLIP score, garment type, on-model, colour, cut-off:
:mod:`fashion_sd.evaluation.judge`). Results accumulate in a scores table
(:data:`fashion_sd.rundir.SCORES_CSV`), one row per model, with the per-image judgements beside
its images; a checkpoint already scored with the same settings is skipped unless ``force``.
``eval.select`` names the column that marks the best checkpoint.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fashion_sd import model_card, rundir
from fashion_sd.precision import dtype_policy
from fashion_sd.catalogue.article_types import singular
from fashion_sd.catalogue.captions import read_captions
from fashion_sd.config import Config
from fashion_sd.errors import FashionSDError
from fashion_sd.evaluation.fid import (
    cached_stats,
    feature_stats,
    frechet_distance,
    kid,
    kid_subset_size,
    stats_key,
    warn_if_biased,
)
from fashion_sd.evaluation.distance_columns import (
    DistanceColumns,
    Networks,
    RealSet,
    load_dinov2,
)
from fashion_sd.evaluation.judge import SUMMARY, load_judge, summarise
from fashion_sd.images import load_image
from fashion_sd.rundir import SCORES_GRID as GRID
from fashion_sd.rundir import EvalDir, RunDir
from fashion_sd.sd import lora_file

log = logging.getLogger(__name__)

COLUMNS = ["checkpoint", "epoch", "step", "fid", "fid_se", "kid_mean", "kid_std", "kid_subset_size",
           "cmmd", "cmmd_se", "fd_dinov2", "fd_dinov2_se", "precision", "recall", "density",
           "coverage", "inception_precision", "inception_recall", "inception_density",
           "inception_coverage", "clip_score", "type_top1", "type_top3", "colour_top1", "gender_top1", "on_model_rate",
           "colour_accuracy", "colour_judged_share", "cut_off_rate", "cut_off_judged_share",
           "cut_off_low", "cut_off_high", "type_chance", "colour_chance", "gender_chance", "n_real", "n_generated", "backend", "protocol", "comparable",
           "clip_model", "dinov2_model", "weights_source", "settings", "notes", "selected"]
BASE = "base"
# The real split's photos, judged as the models' images are: each judged column's ceiling.
REAL = "real"
# A zero-shot column is near chance when the real photos recover less than this share of the
# way from chance to 1: then it says little about a checkpoint, and eval.select does not pick
# by it.
NEAR_CHANCE = 0.25
CHANCE = {"type_top1": "type_chance", "colour_top1": "colour_chance",
          "gender_top1": "gender_chance"}
# eval.select -> (column, lower is better)
SELECT = {"kid": ("kid_mean", True), "fid": ("fid", True), "clip": ("clip_score", False),
          "type_accuracy": ("type_top1", False), "colour_top1": ("colour_top1", False),
          "gender_top1": ("gender_top1", False), "cmmd": ("cmmd", True),
          "fd_dinov2": ("fd_dinov2", True), "coverage": ("coverage", False),
          "density": ("density", False)}


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
    types: list[str | None] = field(default_factory=list)  # each prompt's garment (singular)
    colours: list[str | None] = field(default_factory=list)  # each prompt's baseColour
    vocabulary: list[str] = field(default_factory=list)  # the run's garment types
    genders: list[str | None] = field(default_factory=list)  # each prompt's gender
    colour_names: list[str] = field(default_factory=list)  # the run's colours (zero-shot classes)

    @property
    def settings_id(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]


def make_plan(cfg: Config, split: str, num_images: int | None, backend_id: str = "") -> Plan:
    table = read_captions(cfg.data.captions)
    rows = table[table.split == split]
    if rows.empty:
        raise EvaluationError(f"{cfg.data.captions}: the {split!r} split is empty; build captions "
                              "with a non-zero captions.split fraction for it")
    if len(rows) < 2:
        raise EvaluationError(f"{cfg.data.captions}: the {split!r} split has one image; FID and "
                              "KID compare two sets' spreads, which need 2 or more: build "
                              "captions with a larger captions.split fraction for it")
    if (rows.image_path == "").any():
        raise EvaluationError(f"{cfg.data.captions}: rows without image_path; rebuild with --images")
    n = num_images or cfg.eval.num_images or len(rows)
    captions = rows.caption.tolist()
    pick = [i % len(captions) for i in range(n)]
    prompts = [captions[i] for i in pick]
    seeds = [cfg.seed + i for i in range(n)]
    settings = {"split": split, "n": n, "steps": cfg.eval.steps, "guidance": cfg.eval.guidance,
                "resolution": cfg.data.resolution, "seed": cfg.seed, "backend": backend_id,
                "weights": cfg.model.weights, "protocol": cfg.eval.protocol,
                "clip": f"{cfg.eval.clip}/{cfg.eval.clip_preset}",
                # generated pixels rounded, as the real photos are (truncated before 2026-12-07:
                # rows scored so are not compared with these)
                "rounding": "round", "captions": hashlib.sha256(
                    "\n".join(captions).encode()).hexdigest()[:12]}
    types, vocabulary = garment_types(table, rows)
    colours, colour_names = attribute(table, rows, "baseColour")
    genders, _ = attribute(table, rows, "gender")
    return Plan(prompts, seeds, rows.image_path.tolist(), settings,
                [types[i] for i in pick], [colours[i] for i in pick], vocabulary,
                [genders[i] for i in pick], colour_names)


def attribute(table: pd.DataFrame, rows: pd.DataFrame, column: str) -> tuple[list, list[str]]:
    """Each row's value of a catalogue ``column`` (None where empty or absent) and the values
    the whole captions file holds: the classes a zero-shot judge chooses from."""
    if column not in table:
        return [None] * len(rows), []
    values = sorted({v for v in table[column] if isinstance(v, str) and v})
    return [v if isinstance(v, str) and v else None for v in rows[column]], values


def garment_types(table: pd.DataFrame, rows: pd.DataFrame) -> tuple[list, list[str]]:
    """Each row's garment type as its caption names it (singular), and the whole captions
    file's types: the vocabulary zero-shot classification chooses from."""
    if "articleType" not in table:
        return [None] * len(rows), []

    with warnings.catch_warnings():  # unknown types were reported when captions were built
        warnings.simplefilter("ignore")
        names = {t: singular(t) for t in table.articleType.unique() if t}
    return [names.get(t) for t in rows.articleType], sorted(set(names.values()))


def generate_for(sampler, plan: Plan, batch_size: int, save=None, progress=None):
    """The plan's images, batched by prompt; each handed to ``save(i, image)`` when given."""
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
    if save is not None:
        for i, img in enumerate(images):
            save(i, img)
    return np.stack(images)


def score(gen_feats: np.ndarray, real: dict, cfg: Config) -> dict:

    mu, sigma = feature_stats(gen_feats)
    fid = frechet_distance(mu, sigma, real["mu"], real["sigma"])
    m = kid_subset_size(len(gen_feats), len(real["features"]), cfg.eval.kid_subset_size)
    k_mean, k_std = kid(gen_feats, real["features"], cfg.eval.kid_subsets, m, seed=cfg.seed)
    return {"fid": fid, "kid_mean": k_mean, "kid_std": k_std, "kid_subset_size": m}


def near_chance(df: pd.DataFrame, column: str) -> bool:
    """Whether the real photos' row scores ``column`` near its chance level (:data:`NEAR_CHANCE`)."""
    real = df[df.checkpoint == REAL]
    if column not in CHANCE or real.empty or CHANCE[column] not in real:
        return False
    ceiling, level = (pd.to_numeric(real[c], errors="coerce").iloc[0] for c in (column, CHANCE[column]))
    return bool(pd.notna(ceiling) and pd.notna(level) and ceiling < level + NEAR_CHANCE * (1 - level))


def select_best(df: pd.DataFrame, select: str) -> tuple[int | None, str]:
    """The index of the best checkpoint row by ``eval.select`` and the column used; the base
    model and the real photos are never selected. A CLIP column with no values (CLIP off), or
    one whose real row is near chance (:func:`near_chance`), falls back to KID."""
    scored = df[~df.checkpoint.isin([BASE, REAL])]
    column, lower = SELECT[select]
    if column not in scored or scored[column].isna().all() or near_chance(df, column):
        column, lower = SELECT["kid"]
    values = pd.to_numeric(scored[column], errors="coerce").dropna()
    if values.empty:
        return None, column
    return int(values.idxmin() if lower else values.idxmax()), column


def _num(value, fmt: str = "{:.3g}", scale: float = 1.0) -> str:
    return "" if value is None or pd.isna(value) else fmt.format(scale * float(value))


def _judged(row, rate: str) -> str:
    """A garment rate with the share of images it could judge: ``0.62 (95%)``; the cut-off
    rate also with its bounds over every image: ``0.20 (60%; 0.12-0.52)``."""
    share = row.get(rate.replace("accuracy", "judged_share").replace("rate", "judged_share"))
    bounds = ""
    if rate == "cut_off_rate" and _num(row.get("cut_off_low")):
        bounds = f"; {_num(row.get('cut_off_low'), '{:.2f}')}-{_num(row.get('cut_off_high'), '{:.2f}')}"
    return _num(row.get(rate), "{:.2f}") + (f" ({_num(share, '{:.0%}')}{bounds})" if _num(share) else "")


def _plus_minus(r, column: str, fmt: str = "{:.4g}") -> str:
    """``12.3 ± 0.4``: a distance and its bootstrap standard error, where there is one."""
    value, se = _num(r.get(column), fmt), _num(r.get(f"{column}_se"), "{:.2g}")
    return f"{value} ± {se}" if value and se else value


def _distance_lines(df: pd.DataFrame) -> list[str]:
    """The distances beside FID, one row per model (the real photos have none)."""
    lines = ["| checkpoint | FID ± se | CMMD ± se | FD-DINOv2 ± se | precision / recall / density "
             "/ coverage (DINOv2) | the same (Inception) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for _, r in df[df.checkpoint != REAL].iterrows():
        prdc = [" / ".join(_num(r.get(prefix + c), "{:.2f}") for c in
                           ("precision", "recall", "density", "coverage"))
                if _num(r.get(prefix + "precision")) else "" for prefix in ("", "inception_")]
        lines.append(f"| {r.checkpoint} | {_plus_minus(r, 'fid')} | {_plus_minus(r, 'cmmd', '{:.3f}')} | "
                     f"{_plus_minus(r, 'fd_dinov2')} | {prdc[0]} | {prdc[1]} |")
    return lines


def _distance_notes(df: pd.DataFrame, first) -> list[str]:
    """Which networks the distances beside FID used, and what their sample sizes allow."""
    rows = df[df.checkpoint != REAL]
    notes = [n for n in dict.fromkeys(
        part for text in rows.get("notes", pd.Series(dtype=str)).dropna().astype(str)
        for part in text.split("; ") if part)]
    clip = first.get("clip_model")
    dino = first.get("dinov2_model")
    made = [f"CMMD on the image embeddings of {clip} (the paper's: CLIP ViT-L/14@336)"
            if isinstance(clip, str) and _num(first.get("cmmd")) else "",
            f"FD-DINOv2 and PRDC on {dino}" if isinstance(dino, str) else ""]
    text = "; ".join(m for m in made if m)
    out = [f"{text}. ± is the bootstrap standard error over resampled images (eval.bootstrap); "
           "two checkpoints whose difference is within about twice it do not differ at this "
           "size." if text else "± is the bootstrap standard error (eval.bootstrap)."]
    return out + ([f"Notes: {'; '.join(notes)}."] if notes else [])


def write_tables(df: pd.DataFrame, out: Path, label: str, select: str = "kid",
                 clip_note: str = "") -> pd.DataFrame:
    """The scores table (the best row per ``select`` marked ``selected``), its one-screen
    markdown summary and its plots; returns the table as written."""
    df = df.copy()
    best, column = select_best(df, select)
    df["selected"] = [i == best for i in df.index]
    folder = EvalDir(out)
    folder.write_scores(df)
    comparable = bool(df.comparable.astype(str).isin(["True", "true"]).all())
    lines = ["| checkpoint | epoch | FID | KID (x1e3) | CLIP score | type top-1 / top-3 | "
             "colour (CLIP) | gender (CLIP) | on-model | colour | cut off |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, r in df.iterrows():
        mark = " **best**" if i == best else ""
        kid = (f"{_num(r.kid_mean, '{:.4g}', 1e3)} ± {_num(r.kid_std, '{:.2g}', 1e3)}"
               if _num(r.kid_mean) else "")
        types = (f"{_num(r.type_top1, '{:.2f}')} / {_num(r.type_top3, '{:.2f}')}"
                 if pd.notna(r.type_top1) else "")
        lines.append(f"| {r.checkpoint}{mark} | {_num(r.epoch, '{:g}')} | {_num(r.fid, '{:.4g}')} "
                     f"| {kid} | {_num(r.clip_score, '{:.1f}')} | {types} | "
                     f"{_num(r.get('colour_top1'), '{:.2f}')} | {_num(r.get('gender_top1'), '{:.2f}')} | "
                     f"{_num(r.on_model_rate, '{:.2f}')} | {_judged(r, 'colour_accuracy')} | "
                     f"{_judged(r, 'cut_off_rate')} |")
    lines += ["", *_distance_lines(df)]
    first = df[df.checkpoint != REAL].iloc[-1] if (df.checkpoint != REAL).any() else df.iloc[-1]
    notes = [f"Best by {column} (eval.select: {select}). {int(first.n_generated)} generated "
             f"images against {int(first.n_real)} real ones (the {'same' if df.n_real.nunique() == 1 else 'varying'} "
             f"for every row). Inception: {first.backend}, protocol {first.protocol}. "
             f"SD weights: {first.weights_source}. CLIP: {first.clip_model if isinstance(first.clip_model, str) else 'off'}."]
    if clip_note:
        notes.append(f"CLIP metrics off: {clip_note}")
    if (df.checkpoint == REAL).any():
        real = df[df.checkpoint == REAL].iloc[0]
        chance = ", ".join(f"{c.split('_')[0]} {_num(real.get(CHANCE[c]), '{:.2f}')}"
                           for c in CHANCE if _num(real.get(CHANCE[c])))
        notes.append("The **real** row judges the split's own photos as the models' images are "
                     "judged: each column's ceiling (FID and KID: none). Zero-shot chance levels: "
                     f"{chance or 'not measured'}; colour counts the named neighbours as right, "
                     "gender counts Men's, Women's and Unisex as right for a Unisex garment.")
        low = [c for c in CHANCE if near_chance(df, c)]
        if low:
            notes.append(f"Near chance on the real photos (never used to select): "
                         f"{', '.join(low)}.")
    notes += _distance_notes(df, first)
    if not comparable:
        notes.append("**NOT COMPARABLE**: FID/KID from Inception weights other than the published "
                     "FID network (eval.backend: tfhub); they compare checkpoints of this table, "
                     "never published FIDs.")
    if int(df.n_real.min()) < 2048 or int(df.n_generated.min()) < 2048:
        notes.append("Fewer than 2048 images: FID is biased upwards at this size; compare KID, "
                     "which is unbiased.")
    sized = df[df.kid_subset_size.notna()]
    halved = sized[sized.kid_subset_size.astype(int) == np.maximum(
        2, np.minimum(sized.n_real.astype(int), sized.n_generated.astype(int)) // 2)]
    if len(halved):
        notes.append(f"KID subsets of {int(halved.kid_subset_size.min())} images: half the "
                     "smaller set, so the subsets differ (eval.kid_subset_size applies to sets "
                     "larger than it).")
    if isinstance(first.clip_model, str) and "RANDOM" in first.clip_model:
        notes.append("**CLIP RANDOM-INIT**: CLIP score, type accuracy and on-model rate mean "
                     "nothing.")
    notes.append("Colour: the garment's dominant colour within the prompt's colour or a named "
                 "neighbour; cut off: the garment (not the person wearing it) runs off the frame "
                 "(evaluation/garment.py). Both are rates over the images where a garment was found "
                 "(share judged in brackets); the others are undetermined, not wrong. The "
                 "cut-off rate's bounds count them as whole and as cut off: a model that crops "
                 "more is judged less often, so compare the bounds too.")
    # drawn by evaluate() once every model is scored (write_grid)
    grid = f"\n![real vs generated, one row per prompt]({GRID})\n"
    folder.write_summary("# Scores per checkpoint\n\n" + "\n".join(lines)
                      + "\n\n" + "\n\n".join(notes) + "\n" + grid)
    folder.write_plot(df, label if comparable else
                      f"NOT COMPARABLE (not the published FID Inception). {label}")
    return df


def _key_name(model) -> str:
    """A model's name in the scores table: ``base`` or the checkpoint's name."""
    return model if model == BASE else rundir.checkpoint_name(model)


@dataclass
class Scope:
    """Which images a scoring uses and where its tables go (the command's flags)."""

    split: str | None = None  # default: eval.split
    num_images: int | None = None  # generated images per model; default: eval.num_images
    out: str | Path | None = None  # default: OUTPUT.DIR/eval


@dataclass
class Parts:
    """What a caller may put in place of the real pieces: the Inception network, the Stable
    Diffusion builder ``build(source, resolution)``, the CLIP judge, the DINOv2 network (tests
    pass small ones), and a progress bar."""

    extractor: object = None
    build: object = None
    judge: object = None
    progress: object = None
    dinov2: object = None  # a DinoV2 (evaluation/dinov2.py) in place of eval.dinov2's


class Scorer:
    """What scoring any model needs, prepared once: the plan, the Inception network and the real
    images' statistics, the judge. Used by :func:`evaluate` and, with ``train.eval_every``,
    by the training loop (:class:`fashion_sd.training.callbacks.EvalDuringTraining`)."""

    def __init__(self, cfg: Config, scope: Scope | None = None, parts: Parts | None = None):
        from fashion_sd.evaluation.inception import load_extractor, real_image_features

        scope, parts = scope or Scope(), parts or Parts()
        self.cfg, self.progress = cfg, parts.progress
        progress, extractor = parts.progress, parts.extractor
        self.out = Path(scope.out) if scope.out else RunDir(cfg.output.dir).eval
        self.dir = EvalDir(self.out)
        self.plan = make_plan(cfg, scope.split or cfg.eval.split, scope.num_images)
        # The scoring networks are float32 whatever a run's mixed precision: evaluation during a
        # bf16 run once scored in bf16 (CLIP scores moved by up to 0.09, untrained Inception
        # features by 0.9%) and cached the real images' statistics so.
        if extractor is None:
            with dtype_policy("float32"):
                extractor = load_extractor(cfg.eval.backend, cfg.eval.inception_weights,
                                           cfg.eval.protocol)
        self.extractor = extractor
        self.plan.settings["backend"] = f"{extractor.name}/{extractor.preprocessing}"
        key = stats_key(self.plan.real_paths, extractor.name, extractor.preprocessing,
                        size=cfg.data.resolution)
        self.real = cached_stats(Path(cfg.data.cache_dir), key, lambda: real_image_features(
            extractor, self.plan.real_paths, cfg.data.resolution, progress=progress))
        warn_if_biased(len(self.plan.real_paths), len(self.plan.prompts))
        self.clip_note = ""
        self._judge, self._dino, self._distances = parts.judge, parts.dinov2, None

    @property
    def judge(self):
        """Loaded on first use: CLIP costs a download or seconds of loading, and a re-run with
        nothing left to score needs none of it."""

        if self._judge is None:
            with dtype_policy("float32"):  # as Inception: see __init__
                self._judge, self.clip_note = load_judge(self.cfg, self.plan.vocabulary,
                                                         self.plan.colour_names)
        return self._judge

    @property
    def distances(self) -> DistanceColumns:
        """CMMD (the judge's CLIP), FD-DINOv2 and PRDC (``eval.dinov2``), standard errors:
        prepared on first use, as the judge is."""
        if self._distances is None:
            cfg, judge = self.cfg, self.judge
            with dtype_policy("float32"):  # as Inception: see __init__
                dino, dino_note = (self._dino, "") if self._dino is not None else \
                    load_dinov2(cfg.eval.dinov2)
            real = RealSet(self.plan.real_paths, lambda p: load_image(p, cfg.data.resolution),
                           Path(cfg.data.cache_dir), cfg.data.resolution, self.real["features"])
            networks = Networks(self.extractor, judge.clip, self.clip_note, dino, dino_note)
            self._distances = DistanceColumns(real, networks, cfg.eval.bootstrap, cfg.seed)
        return self._distances

    def score(self, sampler, name: str, meta: dict, weights_id: str) -> dict:
        """Generate the plan's images with ``sampler`` as it stands and score them: one row."""
        plan = self.plan
        print(f"scoring {name} ({len(plan.prompts)} images, {plan.settings['steps']} steps)")
        images = generate_for(sampler, plan, self.cfg.eval.batch_size,
                              lambda i, img: self.dir.write_image(name, i, plan.seeds[i], img),
                              self.progress)
        features = self.extractor(images)
        with dtype_policy("float32"):
            distances = self.distances.row(images, features)
        return {"checkpoint": name,
                "epoch": float(meta["epoch"]) if "epoch" in meta else math.nan,
                "step": float(meta["step"]) if "step" in meta else math.nan,
                **score(features, self.real, self.cfg), **distances,
                **judge_images(self.judge, images, plan, self.dir, name),
                **self._provenance(len(images), weights_id)}

    def _provenance(self, n_generated: int, weights_id: str) -> dict:
        """What every row records of how it was scored."""
        return {"n_real": len(self.plan.real_paths), "n_generated": n_generated,
                "backend": self.extractor.name, "protocol": self.extractor.protocol,
                "comparable": self.extractor.comparable,
                "clip_model": self.judge.clip.label if self.judge.clip is not None else None,
                "weights_source": weights_id, "settings": self.plan.settings_id}

    def score_real(self) -> dict:
        """The real split's photos, one per generated image as the plan pairs them with its
        prompts, judged as the models' images are: the row that shows each column's ceiling."""
        plan, n_real = self.plan, len(self.plan.real_paths)
        images = [load_image(plan.real_paths[i % n_real], self.cfg.data.resolution)
                  for i in range(len(plan.prompts))]
        judged = judge_images(self.judge, images, plan, self.dir, REAL)
        return {"checkpoint": REAL, "epoch": math.nan, "step": math.nan, **judged,
                **self.judge.chances(plan.colours, plan.genders),
                **self._provenance(len(images), "the real photos")}

    def previous(self) -> pd.DataFrame:
        table = self.dir.read_scores()
        table = pd.DataFrame(columns=COLUMNS) if table is None else table
        return table.reindex(columns=COLUMNS)  # a table from before a column was added

    def record(self, row: dict, label: str) -> pd.DataFrame:
        """The folder's scores table with ``row`` in place of any row of the same model and
        settings, written; returns it. The table is read again under the folder's lock, not
        taken from this scoring's start: another evaluation into the same folder may have
        added rows since, and rewriting a table read before lost them."""
        with self.dir.scores_locked():
            table = self.previous()
            keep = [(c, s) != (row["checkpoint"], row["settings"])
                    for c, s in zip(table.checkpoint, table.settings)]
            table = _ordered(pd.concat([table[keep], pd.DataFrame([row], columns=COLUMNS)],
                                       ignore_index=True))
            write_tables(table, self.out, label, self.cfg.eval.select, self.clip_note)
            # as a reader of fid.csv gets it (one dtype per column, whichever rows came first)
            return self.previous()


def evaluate(cfg: Config, checkpoints=None, include_base: bool = False, force: bool = False,
             scope: Scope | None = None, parts: Parts | None = None) -> pd.DataFrame:
    """Score the base model and/or ``checkpoints`` (a folder, a file or a glob); returns the
    whole scores table. ``force`` scores again what was scored with the same settings."""
    from fashion_sd.serving.generate import Inference

    paths = find_checkpoints(checkpoints) if checkpoints else []
    if not paths and not include_base:
        raise EvaluationError("nothing to score: give --checkpoints DIR|GLOB and/or --include-base")
    for p in paths:  # a bad file fails here, before any work (headers only)
        lora_file.check(p, fits_model=False)
    parts = parts or Parts()
    scorer = Scorer(cfg, scope, parts)
    settings = scorer.plan.settings_id
    previous = scorer.previous()
    done = set(zip(previous.checkpoint, previous.settings)) if not force else set()
    wanted = ([BASE] if include_base else []) + paths
    todo = [m for m in wanted if (_key_name(m), settings) not in done]
    if not todo:
        print(f"every model is already scored with these settings in "
              f"{scorer.out / rundir.SCORES_CSV} (--force recomputes)")
        return previous

    inference = Inference(cfg.model, cfg.data.resolution, cfg.seed, parts.build)
    source, table = inference.source, previous
    for model in todo:
        meta = inference.use(None if model == BASE else model)
        row = scorer.score(inference.sampler, _key_name(model), meta, source.id)
        table = scorer.record(row, source.label)  # after each model: a crash loses one
    if (REAL, settings) not in done:
        table = scorer.record(scorer.score_real(), source.label)
    write_grid(scorer.plan, table, scorer.out, source.label)
    model_card.refresh_cards(scorer.out)  # a run's eval/: its cards now show these scores
    return table


def judge_images(judge, images, plan: Plan, folder: EvalDir | None = None,
                 model: str = "") -> dict:
    """The judge's summary columns for one model's images; the per-image rows go to
    ``folder`` beside the model's images."""
    judged = judge(images, plan.prompts, plan.types, plan.colours, plan.genders)
    if folder is not None:
        judged.insert(0, "prompt", plan.prompts)
        judged.insert(0, "seed", plan.seeds)
        folder.write_judged(model, judged)
    summary = summarise(judged)
    return {k: summary[k] for k in SUMMARY}


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    """The real photos first, then the base model, then the checkpoints by epoch."""
    real, base = table.checkpoint == REAL, table.checkpoint == BASE
    return pd.concat([table[real], table[base],
                      table[~base & ~real].sort_values(["epoch", "checkpoint"])],
                     ignore_index=True)


def write_grid(plan: Plan, table: pd.DataFrame, out: Path, label: str, rows: int = 4) -> Path | None:
    """One row per prompt (the first distinct ones): the real image beside the base model's,
    the selected checkpoint's and the last checkpoint's image for it."""
    names = []
    if (table.checkpoint == BASE).any():
        names.append(BASE)
    scored = table[~table.checkpoint.isin([BASE, REAL])]
    if len(scored):
        chosen = scored[scored.selected.astype(bool)] if "selected" in scored else scored.iloc[:0]
        names += list(dict.fromkeys([*chosen.checkpoint, scored.checkpoint.iloc[-1]]))
    firsts = list(dict.fromkeys(plan.prompts))[:rows]
    grid_rows = []
    for prompt in firsts:
        i = plan.prompts.index(prompt)
        cells = [np.asarray(Image.open(plan.real_paths[i % len(plan.real_paths)]).convert("RGB"))]
        for name in names:
            path = EvalDir(out).image(name, i, plan.seeds[i])
            if path.is_file():
                cells.append(np.asarray(Image.open(path).convert("RGB")))
        grid_rows.append((prompt, cells))
    if not grid_rows:
        return None
    return EvalDir(out).write_grid(grid_rows, label,
                                   f"real ({plan.settings['split']} split) vs generated",
                                   ["real", *names])
