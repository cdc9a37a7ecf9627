"""The fashion assistant's logic, free of any web framework: vocabulary, prompts, checkpoints,
the gallery on disk, and one model serving generation requests.

``fashion_sd.serving.webapp`` puts a Gradio page on top; everything here is plain Python and is tested
without a browser.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import safe_open

from fashion_sd.catalogue.caption_text import caption_from_attributes
from fashion_sd.caption_template import DERIVED_FIELDS, MISSING_TOKENS, CaptionError
from fashion_sd.errors import FashionSDError
from fashion_sd.rundir import BEST, GALLERY, LAST, RunDir, checkpoint_name
from fashion_sd.sd.tokenizer import MAX_LENGTH
from fashion_sd.serving.generate import Inference
from fashion_sd.serving.image_settings import ImageSettings

# The pickers, in the order the caption names them.
ATTRIBUTES = ("year", "usage", "season", "colour", "gender", "article")
LIMITS = {"num_images": (1, 8), "steps": (1, 150), "guidance": (0.0, 30.0), "strength": (0.0, 1.5)}
BASE = "base"


class RequestError(FashionSDError, ValueError):
    """A request the page should answer with a message beside a field, not a stack trace.

    ``field`` names the input the message belongs to.
    """

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# --------------------------------------------------------------------------------------------
# Vocabulary and prompts


def vocabulary(captions_path: str | Path) -> dict[str, list[tuple[str, int]]]:
    """Each attribute's values in the training captions, with how many images have it.

    Years newest first, everything else most frequent first: the choices a designer sees are the
    catalogue's own words, so prompts stay in the training distribution.
    """
    path = Path(captions_path)
    if not path.is_file():
        raise CaptionError(f"{path}: captions file not found; build it with "
                           "scripts/build_captions.py (the pickers list its values)")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [DERIVED_FIELDS[a] for a in ATTRIBUTES if DERIVED_FIELDS[a] not in table.columns]
    if missing:
        raise CaptionError(f"{path}: no column(s) {', '.join(missing)}; rebuild it with "
                           "scripts/build_captions.py")
    out = {}
    for attr in ATTRIBUTES:
        values = table[DERIVED_FIELDS[attr]].str.strip()
        counts = values[~values.isin(MISSING_TOKENS)].value_counts()
        if attr == "year":
            order = sorted(counts.index, key=lambda y: (-float(y) if _is_number(y) else math.inf, y))
        else:
            order = sorted(counts.index, key=lambda v: (-counts[v], v))
        out[attr] = [(v, int(counts[v])) for v in order]
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_prompt(template: str, attributes: dict[str, str | None], free_text: str = "",
                 replace: bool = False) -> str:
    """The prompt the model sees: the caption of the picked attributes, through the caption
    builder, extended by ``free_text`` (or replaced by it when ``replace``)."""
    free_text = (free_text or "").strip()
    if replace:
        if not free_text:
            raise RequestError("free_text", "type a prompt to replace the built one, or untick "
                                            "\"replace\"")
        return free_text
    picked = {k: v for k, v in attributes.items() if v not in (None, "")}
    if not picked.get("article"):
        if free_text:
            return free_text
        raise RequestError("article", "pick an article type (or type a prompt)")
    caption = caption_from_attributes(template, **picked)
    return f"{caption}, {free_text}" if free_text else caption


def prompt_warnings(prompt: str, tokenizer) -> list[str]:
    """What a designer should know about a prompt before generating (empty: an error)."""

    if not prompt or not prompt.strip():
        raise RequestError("prompt", "the prompt is empty: pick an article type or type a prompt")
    n = len(tokenizer.encode(prompt))  # with the start and end tokens
    if n > MAX_LENGTH:
        return [f"The prompt is {n} tokens; CLIP reads {MAX_LENGTH}, so its end is cut off."]
    return []


def _as_number(name: str, value) -> float:
    """``value`` (a number, or its text, as a script may send it) as a float, or a RequestError
    naming the field; never a TypeError from the server."""
    label = name.replace("_", " ")
    if value is None or isinstance(value, bool):
        raise RequestError(name, f"{label} must be a number, not {value!r}")
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise RequestError(name, f"{label} must be a number, not {shown}") from None


def check_settings(num_images, steps, guidance, strength, seed) -> dict:
    """Numbers from the page or the API, checked and typed; a RequestError names the field.
    Text that is not a number, NaN, infinities and fractions where a whole number is needed are
    all RequestErrors."""
    values = {"num_images": num_images, "steps": steps, "guidance": guidance,
              "strength": strength}
    out = {}
    for name, value in values.items():
        lo, hi = LIMITS[name]
        number = _as_number(name, value)
        if not (lo <= number <= hi) or not math.isfinite(number):
            raise RequestError(name, f"{name.replace('_', ' ')} must be between {lo:g} and {hi:g}, "
                                     f"not {value}")
        out[name] = number
    for name in ("num_images", "steps"):
        if out[name] != int(out[name]):
            raise RequestError(name, f"{name.replace('_', ' ')} must be a whole number")
        out[name] = int(out[name])
    number = _as_number("seed", seed)
    if not math.isfinite(number) or number != int(number):
        raise RequestError("seed", f"seed must be a whole number, not {seed}")
    out["seed"] = int(number)
    if not 0 <= out["seed"] < 2**31:
        raise RequestError("seed", "seed must be between 0 and 2147483647")
    return out


# --------------------------------------------------------------------------------------------
# Checkpoints of a run


@dataclass
class Checkpoint:
    name: str
    path: Path | None  # None: the base model
    epoch: float | None = None
    step: int | None = None
    val_loss: float | None = None
    fid: float | None = None
    kid: float | None = None
    selected: bool = False  # the evaluation's eval.select choice
    comparable: bool = True
    best: bool = False

    @property
    def label(self) -> str:
        parts = ["base model" if self.path is None else self.name]
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch:g}")
        if self.val_loss is not None:
            parts.append(f"val loss {self.val_loss:.4f}")
        if self.fid is not None:
            parts.append(f"FID {self.fid:.4g}" + ("" if self.comparable else " (not comparable)"))
        if self.kid is not None:
            parts.append(f"KID {self.kid:.3g}")
        return " · ".join(parts) + ("  ★ best" if self.best else "")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def checkpoint_files(run_dir: str | Path | None, extra=()) -> list[Path]:
    """The LoRA files the app may serve: those under the run (no link leading out) and ``extra``."""
    files = []
    if run_dir is not None:
        run_dir = Path(run_dir)
        files = [p for p in RunDir(run_dir).all_checkpoints() if _inside(p, run_dir)]
    return files + [Path(p) for p in extra]


def list_checkpoints(run_dir: str | Path | None, extra=()) -> list[Checkpoint]:
    """The base model, then every LoRA checkpoint of the run, with epoch, val loss and the
    FID/KID that ``evaluate_fid.py`` measured; the best one marked (the one the evaluation
    selected by ``eval.select`` where scored, else lowest val loss). Only files under the run directory (and ``extra``, given by whoever
    started the app) are listed: a link that leads out of the run is left out.
    """

    rows = [Checkpoint(BASE, None)]
    files = checkpoint_files(run_dir, extra)
    run = RunDir(run_dir) if run_dir is not None else None
    history = run.read_history() if run else None
    scores = run.read_scores() if run else None
    for path in files:
        try:
            with safe_open(str(path), "numpy") as fh:
                meta = dict(fh.metadata() or {})
        except Exception:  # an unreadable file is listed as such and fails when chosen
            meta = {}
        ckpt = Checkpoint(checkpoint_name(path), path)
        if "epoch" in meta:
            ckpt.epoch = float(meta["epoch"])
        if "step" in meta:
            ckpt.step = int(float(meta["step"]))
        if history is not None and ckpt.step is not None:
            match = history[history["step"] == ckpt.step]
            if len(match) and pd.notna(match["val_loss"].iloc[-1]):
                ckpt.val_loss = float(match["val_loss"].iloc[-1])
        rows.append(ckpt)
    if scores is not None:
        for ckpt in rows:
            match = scores[scores["checkpoint"] == ckpt.name]
            if len(match):
                last = match.iloc[-1]  # the latest scoring of this model
                ckpt.fid, ckpt.kid = float(last["fid"]), float(last["kid_mean"])
                ckpt.comparable = str(last.get("comparable", True)) not in ("False", "false")
                ckpt.selected = str(last.get("selected", False)) in ("True", "true")
    # best.* and last.* are copies of an epoch's file: never the one marked best.
    epochs = [c for c in rows if c.path is not None and c.name not in (BEST, LAST)]
    scored = [c for c in epochs if c.fid is not None and math.isfinite(c.fid)]
    by_loss = [c for c in epochs if c.val_loss is not None and math.isfinite(c.val_loss)]
    chosen = [c for c in scored if c.selected]
    if chosen:
        chosen[-1].best = True
    elif scored:  # a scores table from before eval.select
        min(scored, key=lambda c: c.fid).best = True
    elif by_loss:
        min(by_loss, key=lambda c: c.val_loss).best = True
    return rows


# --------------------------------------------------------------------------------------------
# The gallery: every image with its settings, on disk


class Gallery:
    """PNGs under ``folder``, each written atomically with its settings in PNG text metadata,
    so the gallery survives a restart and ``scripts/generate.py --from-png`` reproduces any image."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def save(self, image: np.ndarray, settings: ImageSettings | dict) -> Path:
        if isinstance(settings, dict):
            settings = ImageSettings.from_dict(settings)
        with self._lock:  # a unique name even for two images in the same nanosecond
            stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 10**9:09d}"
            # No text a user typed reaches the file name: the checkpoint name is from our list.
            path = self.folder / f"{stamp}_{settings.checkpoint or BASE}_s{settings.seed}.png"
            settings.save_png(path, image)
        return path

    def items(self, limit: int = 200) -> list[tuple[Path, dict]]:
        """Newest first; files without readable settings are left out."""
        out = []
        for path in sorted(self.folder.glob("*.png"), reverse=True)[:limit]:
            try:
                out.append((path, ImageSettings.read_png(path).to_dict()))
            except (ValueError, OSError, json.JSONDecodeError):
                continue
        return out


def caption_of(settings: dict) -> str:
    """The words under an image in the page."""
    ckpt = settings.get("checkpoint", BASE)
    if settings.get("lora_strength") not in (None, 1.0) and ckpt != BASE:
        ckpt += f" ×{settings['lora_strength']:g}"
    return f"seed {settings['seed']} · {ckpt}"


# --------------------------------------------------------------------------------------------
# One model, serving one request at a time


@dataclass
class Request:
    prompt: str
    seed: int = 0
    num_images: int = 1
    steps: int = 25
    guidance: float = 7.5
    negative_prompt: str = ""
    checkpoint: str = BASE
    strength: float = 1.0


@dataclass
class Result:
    paths: list[Path]
    seeds: list[int]
    settings: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class Assistant:
    """Text encoder, U-Net and decoder loaded once; a LoRA switched in by adding its weight
    change to the kernels (exactly undone for the next one), so a checkpoint or strength change
    never reloads the U-Net.
    """

    def __init__(self, cfg, run_dir=None, extra_loras=(), build=None):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir else None
        self.extra_loras = [Path(p) for p in extra_loras]
        self.inference = Inference(cfg.model, cfg.data.resolution, cfg.seed, build)
        self.source, self.sampler = self.inference.source, self.inference.sampler
        self.comps = self.inference.comps
        self.lock = threading.Lock()
        self.gallery = Gallery(Path(cfg.output.dir) / GALLERY)

    @property
    def random_init(self) -> bool:
        return self.source.is_random

    def checkpoints(self) -> list[Checkpoint]:
        return list_checkpoints(self.run_dir, self.extra_loras)

    def find_checkpoint(self, name: str) -> Checkpoint:
        """A checkpoint by its listed name; anything else is refused (never a path).

        Looks at file names only: a request needs no scores, history or LoRA metadata.
        """
        if name == BASE:
            return Checkpoint(BASE, None)
        for path in checkpoint_files(self.run_dir, self.extra_loras):
            if checkpoint_name(path) == name:
                return Checkpoint(name, path)
        raise RequestError("checkpoint", f"no checkpoint named {name!r} in this run")

    def generate(self, req: Request, on_step=None) -> Result:
        """Images for ``req`` (seeds ``seed, seed+1, ...``), each saved to the gallery."""
        checked = check_settings(req.num_images, req.steps, req.guidance, req.strength, req.seed)
        warnings = prompt_warnings(req.prompt, self.comps.tokenizer)
        ckpt = self.find_checkpoint(req.checkpoint or BASE)
        seeds = [checked["seed"] + i for i in range(checked["num_images"])]
        negative = (req.negative_prompt or "").strip() or None
        strength = checked["strength"] if ckpt.path is not None else 1.0
        with self.lock:
            self.inference.use(ckpt.path, strength)  # a bad file leaves the base model
            images = self.sampler.generate(req.prompt, seeds, checked["steps"],
                                           checked["guidance"], negative, on_step=on_step)
        result = Result([], seeds, warnings=warnings)
        for seed, image in zip(seeds, images):
            settings = ImageSettings(
                prompt=req.prompt, negative_prompt=negative, seed=seed,
                steps=checked["steps"], guidance=checked["guidance"],
                resolution=self.comps.resolution,
                # what --from-png rebuilds: a random init is only reproduced as "random"
                weights="random" if self.source.is_random else self.source.requested,
                weights_id=self.source.id, model_seed=self.cfg.seed,
                random_init=self.source.is_random, checkpoint=ckpt.name,
                lora=None if ckpt.path is None else str(Path(ckpt.path).resolve()),
                lora_strength=strength if ckpt.path is not None else None,
                batch_seeds=seeds, noise=self.sampler.noise,
                rounding=self.sampler.rounding, made_by="fashion-sd assistant")
            result.paths.append(self.gallery.save(image, settings))
            result.settings.append(settings.to_dict())
        return result

    def compare(self, req: Request, on_step=None) -> tuple[Result, Result]:
        """The first seed's image on the base model and on ``req.checkpoint``: what tuning changed."""
        single = dataclasses.replace(req, num_images=1)
        base = self.generate(dataclasses.replace(single, checkpoint=BASE), on_step)
        return base, self.generate(single, on_step)
