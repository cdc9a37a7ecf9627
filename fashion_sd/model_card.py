"""A LoRA's model card: a ``README.md`` as the Hugging Face Hub reads it (YAML front matter, then
markdown), so that every LoRA a user takes away says what it is, how well it scored, what it
was trained on and how to load it.

Where cards go (names from :mod:`fashion_sd.rundir`): ``checkpoints/best.README.md`` and
``checkpoints/last.README.md`` beside a run's two checkpoints, each with the sample grid of that
checkpoint copied beside it (``best.samples.png``), and ``NAME.README.md`` beside every
``convert export-lora --out NAME.safetensors``. A Hub repository has one README.md and a
checkpoints folder holds several LoRAs, so a card is named after its LoRA and uploaded as
``README.md`` with the files beside it (the card says how, in a comment the Hub does not show).

Every figure is read from the run's own files: the checkpoint's metadata, ``run.json``,
``config.yaml``, ``eval/fid.csv`` and the captions the run read. Where one is missing (no
evaluation yet, a LoRA outside any run folder) the card says so and shows nothing in its place.

At the bottom of the house (see ``tests/test_import_graph.py``): the LoRA's metadata are read
with the safetensors header reader, and the few names owned by a stage (the evaluation's
``base``/``real`` rows, the export formats, KerasCV's v1.4 weights id) are repeated here and
checked against their owners by ``tests/test_model_card.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from fashion_sd import remote
from fashion_sd.files import atomic_path, atomic_write_text
from fashion_sd.rundir import (
    BEST,
    CARD_SUFFIX,
    LAST,
    RunDir,
    card_image_path,
    card_path,
    checkpoint_name,
    export_path,
)
from fashion_sd.runlock import RunFolderBusy, RunLock
from fashion_sd.safetensors_file import safetensors_header

log = logging.getLogger(__name__)

BASE_MODEL = "CompVis/stable-diffusion-v1-4"
# The base weights' licence: a LoRA of them is used under its restrictions.
LICENSE = "creativeml-openrail-m"
# KerasCV's published v1.4 (sd.weight_files.PRETRAINED_ID): only then is BASE_MODEL the base.
PRETRAINED_ID = "keras-cv/stable-diffusion-v1.4"
TAGS = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "lora",
        "fashion", "keras", "template:sd-lora"]
EXPORT_FORMATS = ("kohya", "diffusers")  # interop.lora_formats.FORMATS
BASE_ROW, REAL_ROW = "base", "real"  # the scores table's rows that are no checkpoint
CARDED = (BEST, LAST)  # the checkpoints of a run that get a card
WIDGET_PROMPTS = 3

# The scores part: (label, fid.csv column, how its value is shown).
SCORE_ROWS = [
    ("FID (Inception; lower is better)", "fid", "num"),
    ("FID standard error", "fid_se", "num"),
    ("KID mean", "kid_mean", "num"),
    ("KID standard deviation", "kid_std", "num"),
    ("KID subset size", "kid_subset_size", "int"),
    ("CMMD (the judge's CLIP)", "cmmd", "num"),
    ("CMMD standard error", "cmmd_se", "num"),
    ("FD-DINOv2", "fd_dinov2", "num"),
    ("FD-DINOv2 standard error", "fd_dinov2_se", "num"),
    ("precision (DINOv2)", "precision", "num"),
    ("recall (DINOv2)", "recall", "num"),
    ("density (DINOv2)", "density", "num"),
    ("coverage (DINOv2)", "coverage", "num"),
    ("precision (Inception)", "inception_precision", "num"),
    ("recall (Inception)", "inception_recall", "num"),
    ("density (Inception)", "inception_density", "num"),
    ("coverage (Inception)", "inception_coverage", "num"),
    ("CLIP score", "clip_score", "num"),
    ("garment type top-1", "type_top1", "num"),
    ("garment type top-3", "type_top3", "num"),
    ("colour top-1 (CLIP)", "colour_top1", "num"),
    ("gender top-1 (CLIP)", "gender_top1", "num"),
    ("on-model rate", "on_model_rate", "num"),
    ("colour accuracy (pixels)", "colour_accuracy", "num"),
    ("colour: share judged", "colour_judged_share", "num"),
    ("cut-off rate", "cut_off_rate", "num"),
    ("cut-off: share judged", "cut_off_judged_share", "num"),
    ("type chance", "type_chance", "num"),
    ("colour chance", "colour_chance", "num"),
    ("gender chance", "gender_chance", "num"),
    ("real images", "n_real", "int"),
    ("generated images", "n_generated", "int"),
    ("judge (CLIP)", "clip_model", "text"),
    ("DINOv2", "dinov2_model", "text"),
    ("Inception", "backend", "text"),
    ("FID protocol", "protocol", "text"),
    ("comparable to published FIDs", "comparable", "text"),
    ("SD weights", "weights_source", "text"),
    ("settings id", "settings", "text"),
]


# --------------------------------------------------------------------------------------------
# What a card is made of, read from the run's files


@dataclass(frozen=True)
class Facts:
    """Everything a card shows, as read; ``None`` or empty where its file is missing."""

    name: str  # the checkpoint's name: best, last, epoch_003
    meta: dict  # the LoRA's safetensors metadata
    run: RunDir | None = None
    record: dict | None = None  # run.json
    config: dict | None = None  # config.yaml, parsed
    config_text: str | None = None  # config.yaml as written
    scores: pd.DataFrame | None = None  # eval/fid.csv
    grid: Path | None = None  # this checkpoint's sample grid in samples/
    prompts: tuple = ()  # the widget's prompts
    prompts_from: str = ""  # where they came from, in words

    @property
    def random_init(self) -> bool:
        """Either file saying so is enough: a LoRA of untrained weights must never pass unmarked."""
        return bool((self.record or {}).get("random_init")) or \
            self.meta.get("random_init", "").lower() == "true"

    @property
    def base_id(self) -> str:
        """The base weights' id: the LoRA's own metadata, else the run's record."""
        weights = (self.record or {}).get("weights")
        return self.meta.get("base_weights") or \
            (weights.get("id", "") if isinstance(weights, dict) else "")

    @property
    def pretrained_base(self) -> bool:
        return self.base_id == PRETRAINED_ID and not self.random_init

    @property
    def step(self) -> int | None:
        return _int(self.meta.get("step"))

    @property
    def epoch(self) -> float | None:
        return _float(self.meta.get("epoch"))

    def section(self, key: str) -> dict:
        """A section of the run's config (config.yaml, else the copy in run.json), or {}."""
        config = self.config or (self.record or {}).get("config") or {}
        value = config.get(key)
        return value if isinstance(value, dict) else {}


def read_meta(lora: str | Path) -> dict:
    """A LoRA file's metadata from its header alone; {} when it cannot be read."""
    try:
        return safetensors_header(lora)[1]
    except (OSError, ValueError):
        return {}


def read_config(run: RunDir) -> tuple[dict | None, str | None]:
    """``config.yaml`` parsed and as written, or (None, None)."""
    try:
        text = run.config.read_text(encoding="utf-8")
        parsed = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None, None
    return (parsed if isinstance(parsed, dict) else None), text


def run_of(lora: str | Path) -> RunDir | None:
    """The run folder a LoRA file sits in (``RUN/checkpoints/x.lora.safetensors`` with
    ``RUN/run.json`` or ``RUN/config.yaml``), or None for a file anywhere else."""
    folder = Path(lora).absolute().parent
    run = RunDir(folder.parent)
    if folder.name == run.checkpoints.name and (run.run_json.is_file() or run.config.is_file()):
        return run
    return None


def sample_grid(run: RunDir, meta: dict) -> Path | None:
    """The grid drawn with this checkpoint's weights: the one of its epoch when it ends one, else
    the one of its step (a run's last step mid-epoch). None when none was drawn there."""
    epoch, step = _float(meta.get("epoch")), _int(meta.get("step"))
    found = []
    if epoch is not None and epoch == int(epoch) and epoch >= 1:
        found.append(run.samples_at_epoch(int(epoch)))
    if step is not None:
        found.append(run.samples_at_step(step))
    return next((p for p in found if p.is_file()), None)


def catalogue_prompts(data: dict, eval_: dict, n: int = WIDGET_PROMPTS) -> list[str]:
    """The first ``n`` distinct captions of the split the evaluation scores (``eval.split``) in
    the run's captions file: catalogue rows the LoRA was not trained on. [] when the file
    cannot be read from here."""
    path, split = data.get("captions"), str(eval_.get("split") or "test")
    try:
        if not path or not remote.is_file(path):
            return []
        with remote.open_file(path) as fh:
            table = pd.read_csv(fh, usecols=["caption", "split"], dtype=str,
                                keep_default_na=False, encoding="utf-8")
    except (OSError, ValueError, UnicodeDecodeError):
        return []
    chosen = table[table["split"].str.strip().str.lower() == split].caption
    return list(dict.fromkeys(c for c in chosen if c.strip()))[:n]


def widget_prompts(train: dict, data: dict, eval_: dict) -> tuple[list, str]:
    """The widget's prompts and where they came from: catalogue captions, else the run's sample
    prompts (what its grids show), so a moved captions file leaves the widget still the run's."""
    prompts = catalogue_prompts(data, eval_)
    if prompts:
        split = eval_.get("split") or "test"
        return prompts, f"the first {len(prompts)} {split}-split captions of `{data['captions']}`"
    sample = [p for p in train.get("sample_prompts") or [] if isinstance(p, str)]
    if sample:
        return sample[:WIDGET_PROMPTS], (f"the run's sample prompts (`train.sample_prompts`): "
                                         f"its captions file `{data.get('captions')}` could not "
                                         "be read when this card was written")
    return [], "none: neither the captions file nor sample prompts could be read"


def read_facts(run: RunDir | None, checkpoint: str | Path) -> Facts:
    """What a card of ``checkpoint`` shows, from its run folder's files (``run`` None: from the
    LoRA's metadata alone)."""
    meta, name = read_meta(checkpoint), checkpoint_name(checkpoint)
    if run is None:
        return Facts(name=name, meta=meta)
    config, text = read_config(run)
    facts = Facts(name=name, meta=meta, run=run, record=run.read_record(), config=config,
                  config_text=text, scores=run.read_scores(), grid=sample_grid(run, meta))
    prompts, source = widget_prompts(facts.section("train"), facts.section("data"),
                                     facts.section("eval"))
    return dataclasses.replace(facts, prompts=tuple(prompts), prompts_from=source)


# --------------------------------------------------------------------------------------------
# The card


def card(run: RunDir | None, checkpoint: str | Path, export_formats=EXPORT_FORMATS,
         card_file: str | Path | None = None) -> str:
    """The README.md of ``checkpoint`` (a fashion-sd LoRA file) as the Hub reads it.

    ``export_formats``: format names, whose exports are looked up beside the checkpoint
    (``best.kohya.safetensors``), or a mapping of format to export file (``convert export-lora``
    writes one anywhere). ``card_file``: where the card will sit (default beside the checkpoint):
    the files it names are written relative to it. ``run`` None: a card from the LoRA's metadata
    alone."""
    card_file = Path(card_file) if card_file else card_path(checkpoint)
    facts = read_facts(run, checkpoint)
    exports = _exports(checkpoint, export_formats)
    image = card_image_path(card_file).name if facts.grid else None
    return render(facts, Files.beside(card_file, checkpoint, exports, image, run))


@dataclass(frozen=True)
class Files:
    """The files a card names, as written in it: relative to the card's folder."""

    card: str
    lora: str
    exports: dict  # format -> file
    image: str | None  # the sample grid's copy
    config: str | None = None  # the run's config.yaml

    @classmethod
    def beside(cls, card_file: Path, lora, exports: dict, image: str | None,
               run: RunDir | None) -> Files:
        folder = Path(card_file).absolute().parent
        return cls(card=Path(card_file).name, lora=_relative(lora, folder),
                   exports={f: _relative(p, folder) for f, p in exports.items()}, image=image,
                   config=_relative(run.config, folder) if run else None)

    @property
    def stem(self) -> str:
        """What every file of this card starts with, for an upload's ``--include``."""
        return self.card.removesuffix(CARD_SUFFIX)


def render(facts: Facts, files: Files) -> str:
    """The card's text: front matter, then each part."""
    parts = [_title(facts), _publishing(facts, files), _warning(facts), _about(facts, files),
             _samples(facts, files), _scores(facts), _training(facts), _data(facts),
             _usage(facts, files), _config(facts)]
    return "---\n" + front_matter(facts, files) + "---\n\n" + \
        "\n\n".join(p.strip("\n") for p in parts if p) + "\n"


def front_matter(facts: Facts, files: Files) -> str:
    """The metadata the Hub reads: base model (only when it is the published v1.4), licence,
    tags, the caption template as the trigger, the widget's prompts with the sample grid."""
    data = {}
    if facts.pretrained_base:
        data["base_model"] = BASE_MODEL
    data["license"] = LICENSE
    if "diffusers" in files.exports:
        data["library_name"] = "diffusers"
    data["pipeline_tag"] = "text-to-image"
    data["tags"] = list(TAGS)
    template = _template(facts)
    if template:
        data["instance_prompt"] = template
    if facts.prompts:
        data["widget"] = [{"text": p, **({"output": {"url": files.image}} if files.image else {})}
                          for p in facts.prompts]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)


def _title(facts: Facts) -> str:
    where = f"{facts.run.root.name} / " if facts.run else ""
    return f"# fashion-sd LoRA: {where}{facts.name}"


def _publishing(facts: Facts, files: Files) -> str:
    """How to publish, for whoever holds the file; a comment, so the Hub page never shows it."""
    origin = f"the run folder {facts.run.root}" if facts.run else "the LoRA's metadata"
    return (f"<!-- Written by fashion-sd from {origin}. To publish it on the Hugging Face Hub, "
            "upload this file as the repository's README.md with the files it names, from "
            f"this folder:\n  hf upload USER/REPO . . --include \"{files.stem}.*\"\n"
            f"  hf upload USER/REPO {files.card} README.md\n-->")


def _warning(facts: Facts) -> str:
    if not facts.random_init:
        return ""
    return ("**RANDOM-INIT: this LoRA was trained on untrained (random) Stable Diffusion weights, "
            "for plumbing checks only. Its images are noise, and it does nothing useful on "
            f"{BASE_MODEL} or any other trained model.**")


def _about(facts: Facts, files: Files) -> str:
    m = facts.meta
    layers = _json(m.get("layers")) or []
    te = sum(1 for x in layers if str(x).startswith("te"))
    if m.get("imported_format"):
        lines = [f"A LoRA of Stable Diffusion v1.x imported into fashion-sd from a "
                 f"{m['imported_format']} file, `{m.get('imported_from', '?')}` (sha256 "
                 f"`{m.get('imported_sha256', '?')}`): not trained by fashion-sd."]
    else:
        lines = ["A LoRA of Stable Diffusion v1.x trained with fashion-sd (Keras 3, KerasCV) on "
                 "a fashion catalogue's product photos and their captions."]
    if facts.run is None:
        lines.append("\nNo run folder was found beside this LoRA: no samples, scores, training "
                     "data or config are known here, only what its file's metadata say.")
    if not m:
        lines.append(f"\nThe LoRA's metadata could not be read (`{files.lora}`).")
        return "\n".join(lines)
    rows = [("kind", {"lora": "LoRA", "dora": "DoRA (Liu et al., 2024: LoRA's direction, a "
                      "magnitude per output channel)"}.get(m.get("type", "lora"), m.get("type"))),
            ("rank / alpha", f"{m.get('rank', '?')} / {m.get('alpha', '?')}"),
            ("targets", ", ".join(_json(m.get("targets")) or []) or "?"),
            ("layers", f"{len(layers) - te} U-Net" + (f", {te} text-encoder" if te else "")
             if layers else "?"),
            ("this checkpoint", _position(facts)),
            ("weights", {"ema": "the EMA of the weights (train.ema_decay)",
                         "raw": "the raw weights"}.get(m.get("weights", ""), "as trained")),
            ("resolution", f"{m['resolution']} px" if m.get("resolution") else "?"),
            ("started from", f"`{m['init_from']}`" if m.get("init_from")
             else f"A: {m['lora_init']} init, B: 0" if m.get("lora_init") else "?"),
            ("base weights", _base_words(facts))]
    return "\n".join([*lines, "", "| | |", "| --- | --- |",
                      *(f"| {k} | {_cell(v)} |" for k, v in rows)])


def _position(facts: Facts) -> str:
    bits = []
    if facts.epoch is not None:
        bits.append(f"epoch {facts.epoch:g}")
    if facts.step is not None:
        bits.append(f"step {facts.step}")
    return f"`{facts.name}`" + (f" ({', '.join(bits)})" if bits else "")


def _base_words(facts: Facts) -> str:
    wid = facts.base_id
    if facts.random_init:
        return f"`{wid or 'random'}`: RANDOM-INIT, not a trained model"
    if facts.pretrained_base:
        return f"`{wid}` (KerasCV's conversion of {BASE_MODEL})"
    return (f"`{wid or 'unknown'}`: not the published v1.4, so `base_model` is left out of this "
            "card's metadata; add the Hub id of the SD 1.x weights it was trained on")


def _samples(facts: Facts, files: Files) -> str:
    if facts.run is None:
        return ""
    train = facts.section("train")
    head = "## Samples\n\n"
    if not facts.grid:
        return head + (f"No sample grid was drawn with this checkpoint's weights (step "
                       f"{facts.step}; `train.sample_every`: {train.get('sample_every', '?')}).")
    prompts = train.get("sample_prompts") or []
    return (head + f"![sample grid of {facts.name}]({files.image})\n\n"
            f"`{_relative(facts.grid, facts.run.root)}` of the run, drawn with this checkpoint's "
            f"weights: one row per prompt of `train.sample_prompts`, one column per seed of "
            f"`train.sample_seeds` ({', '.join(map(str, train.get('sample_seeds') or []))}), "
            f"{train.get('sample_steps', '?')} sampler steps, guidance "
            f"{train.get('sample_guidance', '?')}.\n\n" + "\n".join(f"- {p}" for p in prompts))


def checkpoint_rows(table: pd.DataFrame, name: str, epoch: float | None,
                    step: int | None) -> pd.DataFrame:
    """This checkpoint's rows of a scores table, one per evaluation setting. With its step
    known: the rows of that step named as a checkpoint of that moment can be (``best`` is scored
    as the epoch checkpoint it equals, and a row named ``best`` may hold an earlier best);
    else the rows of its name."""
    names = table.checkpoint.astype(str)
    if step is None or "step" not in table:
        return table[names == name]
    same_moment = {name, BEST, LAST, RunDir.step_name(step)}
    if epoch is not None and epoch == int(epoch):
        same_moment.add(RunDir.epoch_name(int(epoch)))
    return table[names.isin(same_moment) & (pd.to_numeric(table.step, errors="coerce") == step)]


def _scores(facts: Facts) -> str:
    if facts.run is None:
        return ""
    head = "## Scores\n\n"
    where = f"`{_relative(facts.run.scores, facts.run.root)}`"
    if facts.scores is None or "checkpoint" not in facts.scores:
        return head + (f"Not evaluated yet: the run has no {where}. Score it with `fashion-sd "
                       f"evaluate --config config.yaml --checkpoints checkpoints` (its card is "
                       "written again with the scores).")
    rows = checkpoint_rows(facts.scores, facts.name, facts.epoch, facts.step)
    if rows.empty:
        return head + (f"{where} has no row for this checkpoint (step {facts.step}): it was not "
                       "scored. Score it with `fashion-sd evaluate --config config.yaml "
                       f"--checkpoints checkpoints/{facts.name}.lora.safetensors`.")
    parts = [head + f"From {where}: this checkpoint's images and, scored with the same "
             "settings, the base model's and the real photos' (the real photos' judged columns "
             "are each column's ceiling)."]
    for _, row in rows.iterrows():
        parts.append(_scores_table(facts.scores, row))
    return "\n\n".join(parts)


def _scores_table(table: pd.DataFrame, row) -> str:
    """One evaluation setting: a metric per line, a column per model."""
    same = table[table.settings.astype(str) == str(row.settings)] if "settings" in table \
        else table
    models = [row] + [r for name in (BASE_ROW, REAL_ROW)
                      for _, r in same[same.checkpoint == name].iterrows()]
    names = [f"{r.checkpoint}" + (" (this)" if i == 0 else "") for i, r in enumerate(models)]
    lines = ["| | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(models)]
    for label, column, kind in SCORE_ROWS:
        cells = [_value(r.get(column), kind) for r in models]
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(_cell(c) for c in cells) + " |")
    notes = [f"{r.checkpoint}: {r.notes}" for r in models if _value(r.get("notes"), "text")]
    counts = [_float(row.get(c)) for c in ("n_real", "n_generated")]
    if any(n is not None and n < 2048 for n in counts):
        notes.append("Fewer than 2,048 images: FID is biased upwards at this size; KID is not.")
    if _truthy(row.get("selected")):
        notes.insert(0, "eval.select picked this checkpoint as the run's best.")
    return "\n".join(lines + ([""] + [f"- {_cell(n)}" for n in notes] if notes else []))


def _training(facts: Facts) -> str:
    if facts.run is None:
        return ""
    head = "## Training\n\n"
    r = facts.record
    if not r:
        return head + "The run's `run.json` is missing or unreadable: how it ran is unknown."
    train = facts.section("train")
    items = [("status", f"{r.get('status', '?')} at step {r.get('step', '?')} "
              f"(epoch {_show(r.get('epoch'))})"),
             ("final loss / val loss", f"{_show(r.get('final_loss'))} / "
              f"{_show(r.get('final_val_loss'))}"),
             ("best by", f"{r.get('best_by', '?')}: "
              f"{_show(r.get('best_val_loss') if r.get('best_by') == 'val_loss' else r.get('best_train_loss'))}"),
             ("learning rate / batch / epochs", f"{train.get('learning_rate', '?')} / "
              f"{train.get('batch_size', '?')} / {train.get('epochs', '?')}"),
             ("precision, backend", f"{r.get('precision', '?')}, {r.get('backend', '?')}"),
             ("options", ", ".join(f"{k}: {v}" for k, v in (r.get("options") or {}).items()
                                   if v is not None and v is not False
                                   and (v != 0 or k == "mask_background_weight")) or "none"),
             ("trainable parameters", _show(r.get("trainable_parameters"))),
             ("skipped steps", _show(r.get("skipped_steps")))]
    return head + "From the run's `run.json` and `config.yaml`.\n\n" + "\n".join(
        ["| | |", "| --- | --- |", *(f"| {k} | {_cell(v)} |" for k, v in items)])


def _data(facts: Facts) -> str:
    if facts.run is None:
        return ""
    r, data, captions = facts.record or {}, facts.section("data"), facts.section("captions")
    split = captions.get("split") or {}
    lines = ["## Training data", ""]
    if r:
        lines.append(f"- rows: **{_show(r.get('train_images'))} train**, "
                     f"**{_show(r.get('val_images'))} val** images (`run.json`), "
                     f"{_show(r.get('distinct_captions'))} distinct captions")
    else:
        lines.append("- rows: unknown (`run.json` is missing)")
    lines += [f"- catalogue: `{data.get('styles', '?')}`, captions `{data.get('captions', '?')}`, "
              f"images at {data.get('resolution', '?')} px",
              "- split (`captions.split`): " + ", ".join(f"{k} {v}" for k, v in split.items())
              + f", seeded ({_show((facts.config or {}).get('seed'))}), stratified by article "
              f"type (types under {captions.get('stratify_min_count', '?')} rows split together)",
              f"- filters: include {_filters(captions.get('include'))}; exclude "
              f"{_filters(captions.get('exclude'))}; `captions.max_images`: "
              f"{_show(captions.get('max_images')) if captions.get('max_images') else 'none (every kept row)'}",
              f"- caption template: `{_template(facts) or '?'}`",
              f"- widget prompts: {facts.prompts_from}"
              + ("; each shows this checkpoint's sample grid, whose rows are the sample prompts "
                 "above" if facts.grid and facts.prompts else "")]
    return "\n".join(lines)


def _usage(facts: Facts, files: Files) -> str:
    # Without the run's captions, the caption template itself: a prompt in the form it learnt.
    prompt = facts.prompts[0] if facts.prompts else _template(facts) or "PROMPT"
    base = BASE_MODEL if facts.pretrained_base or facts.random_init else "PATH_OR_ID_OF_THE_SD1_BASE"
    out = ["## Use it"]
    diffusers = files.exports.get("diffusers")
    if diffusers:
        folder, weight = os.path.split(diffusers)
        out.append(f"**diffusers** (`{diffusers}`):\n\n```python\nimport torch\n"
                   "from diffusers import StableDiffusionPipeline\n\n"
                   f"pipe = StableDiffusionPipeline.from_pretrained(\"{base}\", "
                   "torch_dtype=torch.float16).to(\"cuda\")\n"
                   f"pipe.load_lora_weights(\"{folder or '.'}\", weight_name=\"{weight}\")  "
                   "# or the Hub repository's id\n"
                   f"image = pipe({json.dumps(prompt)}, num_inference_steps=50, "
                   "guidance_scale=7.5).images[0]\n```")
    else:
        out.append(_export_hint(facts, files, "diffusers", "diffusers"))
    kohya = files.exports.get("kohya")
    if kohya:
        name = Path(kohya).name.removesuffix(".safetensors")
        out.append(f"**AUTOMATIC1111 / ComfyUI** (`{kohya}`): copy it into "
                   "`stable-diffusion-webui/models/Lora/` (ComfyUI: `models/loras/`, then a "
                   f"LoraLoader) and add it to a prompt:\n\n```text\n<lora:{name}:1> {prompt}\n```")
    else:
        out.append(_export_hint(facts, files, "kohya", "AUTOMATIC1111 / ComfyUI"))
    config, whose = (files.config, "; the config is the run's, below") if files.config \
        else ("CONFIG.yaml", "")
    out.append(f"**fashion-sd** (`{files.lora}`{whose}):\n\n```bash\n"
               f"fashion-sd generate --config {config} --lora {files.lora} \\\n"
               f"    --prompt {json.dumps(prompt)} --out out/\n```")
    return "\n\n".join(out)


def _export_hint(facts: Facts, files: Files, fmt: str, who: str) -> str:
    target = f"{Path(files.lora).name.removesuffix('.lora.safetensors')}.{fmt}.safetensors"
    return (f"**{who}**: no {fmt} export beside this card; make one (it gets its own card) with\n\n"
            f"```bash\nfashion-sd convert export-lora --lora {files.lora} --format {fmt} "
            f"--out {target}\n```")


def _config(facts: Facts) -> str:
    if facts.run is None:
        return ""
    if facts.config_text is None:
        return "## Config\n\nThe run's `config.yaml` is missing or unreadable."
    return ("## Config\n\nThe run's `config.yaml`, as resolved (the config that made this LoRA)."
            "\n\n<details>\n<summary>config.yaml</summary>\n\n```yaml\n"
            + facts.config_text.rstrip("\n") + "\n```\n\n</details>")


# --------------------------------------------------------------------------------------------
# Writing


def write_card(checkpoint: str | Path, exports, card_file: str | Path,
               run: RunDir | None = None) -> Path:
    """One card at ``card_file``, with the checkpoint's sample grid copied beside it; ``run``
    None: the run folder ``checkpoint`` sits in, if any."""
    run = run if run is not None else run_of(checkpoint)
    card_file = Path(card_file)
    grid = sample_grid(run, read_meta(checkpoint)) if run else None
    if grid:
        with atomic_path(card_image_path(card_file)) as tmp:
            shutil.copyfile(grid, tmp)
    return atomic_write_text(card_file, card(run, checkpoint, exports, card_file))


def write_cards(run: RunDir, formats=EXPORT_FORMATS) -> list[Path]:
    """The cards of a run's ``best`` and ``last`` (``checkpoints/best.README.md``), naming the
    exports in ``formats`` that sit beside each."""
    return [write_card(run.checkpoint(name), formats, run.card(name), run)
            for name in CARDED if run.checkpoint(name).is_file()]


def refresh_cards(eval_folder: str | Path) -> list[Path]:
    """After an evaluation wrote its scores to ``eval_folder``: the cards of the run whose
    ``eval/`` that is, written again with the new scores; nothing for any other ``--out``.
    A card that cannot be written is a warning: the scores it would show are already saved."""
    eval_folder = Path(eval_folder)
    run = RunDir(eval_folder.parent)
    if eval_folder.name != run.eval.name or run_of(run.best) is None:
        return []
    try:
        # A run still training holds the folder's lock; its RunWriter writes the cards at its
        # end (with these scores): the folder stays its writer's.
        with RunLock(run.lock_file, run.root):
            return write_cards(run)
    except RunFolderBusy:
        log.info("%s is in use by a live run: its cards are written when it ends", run.root)
        return []
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("the model cards of %s were not written: %s: %s", run.checkpoints,
                    type(exc).__name__, exc)
        return []


def write_export_card(lora: str | Path, fmt: str, out: str | Path) -> Path:
    """The card of ``convert export-lora``'s ``out`` (``NAME.README.md`` beside it): from the
    run folder the source LoRA sits in, else from its metadata alone."""
    return write_card(lora, {fmt: Path(out)}, card_path(out))


# --------------------------------------------------------------------------------------------
# Small helpers


def _exports(checkpoint, formats) -> dict:
    if isinstance(formats, dict):
        return {f: Path(p) for f, p in formats.items()}
    return {f: p for f in formats if (p := export_path(checkpoint, f)).is_file()}


def _relative(path, folder) -> str:
    return Path(os.path.relpath(Path(path).absolute(), Path(folder).absolute())).as_posix()


def _template(facts: Facts) -> str:
    return facts.meta.get("caption_template") or facts.section("captions").get("template") or ""


def _value(value, kind: str) -> str:
    """A scores table cell as shown: 4 significant digits, whole counts, text; "" when empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if kind == "text":
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return ""
    return str(int(number)) if kind == "int" else f"{number:.4g}"


def _show(value) -> str:
    if value is None or value == "":
        return "?"
    if isinstance(value, float):
        return "?" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _filters(value) -> str:
    if not value:
        return "nothing" if value == {} else "?"
    return "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in value.items())


def _truthy(value) -> bool:
    return str(value).strip().lower() in ("true", "1", "1.0")


def _json(text):
    try:
        return json.loads(text) if text else None
    except (TypeError, ValueError):
        return None


def _int(text) -> int | None:
    number = _float(text)
    return int(number) if number is not None else None


def _float(text) -> float | None:
    try:
        number = float(text)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _cell(text) -> str:
    """Text safe in a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")
