"""Stable Diffusion v1.4's components, and where their weights come from.

``model.weights`` says where:

- ``pretrained``: KerasCV's published v1.4 files, downloaded once and cached by
  ``keras.utils.get_file`` with their sha256 (the same cache KerasCV itself uses, so a file already
  fetched by KerasCV is reused). Offline without a cache: an error at start that says what to do.
- ``local:DIR``: the same files from a folder, either KerasCV's published ``.h5`` names or their
  Keras 3 ``.weights.h5`` form (what :func:`save_components` writes).
- ``random``: untrained weights, for tests and plumbing checks; every output says so.
- ``auto`` (demo only): pretrained when cached or downloadable, else random with a loud warning.

The networks are the project's own Keras 3 code (:mod:`~fashion_sd.sd.unet`,
:mod:`~fashion_sd.sd.text_encoder`, :mod:`~fashion_sd.sd.vae`), one implementation for every
Keras backend, laid out as KerasCV's ``DiffusionModel``, ``TextEncoder``, ``ImageEncoder`` and
``Decoder`` so that KerasCV's published files load into them unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import keras

from fashion_sd.errors import FashionSDError
from fashion_sd.files import atomic_write_text
from fashion_sd.images import image_size, valid_size
from fashion_sd.sd.text_encoder import TextEncoder
from fashion_sd.sd.tokenizer import MAX_LENGTH, clip_tokenizer
from fashion_sd.sd.unet import DiffusionModel
from fashion_sd.sd.vae import Decoder, ImageEncoder

log = logging.getLogger(__name__)

# At 64 px the U-Net's innermost self-attention sees one token (a 1x1 latent) and Keras warns
# that its softmax is constant: expected there, and noise in every log otherwise.
warnings.filterwarnings("ignore", message="You are using a softmax over axis -1",
                        category=UserWarning)

_HF = "https://huggingface.co/fchollet/stable-diffusion/resolve/main/"


@dataclass(frozen=True)
class WeightFile:
    name: str  # KerasCV's published file name
    sha256: str

    @property
    def origin(self) -> str:
        return _HF + self.name

    @property
    def keras3_name(self) -> str:
        return self.name[: -len(".h5")] + ".weights.h5"


# Origins and hashes as KerasCV 0.9.0 publishes them (keras_cv/src/models/stable_diffusion/*.py).
WEIGHT_FILES = {
    "diffusion_model": WeightFile(
        "kcv_diffusion_model.h5", "8799ff9763de13d7f30a683d653018e114ed24a6a819667da4f5ee10f9e805fe"),
    "text_encoder": WeightFile(
        "kcv_encoder.h5", "4789e63e07c0e54d6a34a29b45ce81ece27060c499a709d556c7755b42bb0dc4"),
    "image_encoder": WeightFile(
        "vae_encoder.h5", "c60fb220a40d090e0f86a6ab4c312d113e115c87c40ff75d11ffcf380aab7ebb"),
    "decoder": WeightFile(
        "kcv_decoder.h5", "ad350a65cc8bc4a80c8103367e039a3329b4231c2469a1093869a345f55b1962"),
}
COMPONENTS = tuple(WEIGHT_FILES)
PRETRAINED_ID = "keras-cv/stable-diffusion-v1.4"


class WeightsError(FashionSDError, RuntimeError):
    """Weights that cannot be had; the message says how to provide them."""


@dataclass
class WeightsSource:
    """Where a model's weights came from, recorded in run.json and written on every figure."""

    kind: str  # "pretrained" | "local" | "random"
    requested: str  # the config value, e.g. "auto" or "local:/data/sd14"
    files: dict[str, Path] = field(default_factory=dict)
    id: str = ""  # identifies the base weights; stored in every LoRA checkpoint

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    @property
    def label(self) -> str:
        """The words written on plots and sample grids."""
        if self.is_random:
            return "RANDOM-INIT weights (not pretrained): images are noise, for plumbing checks only"
        return f"weights: {self.id}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "requested": self.requested, "id": self.id,
                "files": {k: str(v) for k, v in self.files.items()}}


def _download_hint(cache_dir: str | None) -> str:
    where = Path(cache_dir or "~/.keras").expanduser() / "datasets"
    files = "\n".join(f"    {f.origin}  (sha256 {f.sha256})" for f in WEIGHT_FILES.values())
    return (f"Put these files in {where} (the download cache), or in a folder DIR and set "
            f"model.weights: local:DIR:\n{files}")


def fetch_pretrained(components=COMPONENTS, cache_dir: str | None = None) -> dict[str, Path]:
    """Each component's published file from the cache, downloading what is missing (hash-checked)."""
    paths = {}
    for name in components:
        wf = WEIGHT_FILES[name]
        try:
            paths[name] = Path(keras.utils.get_file(
                fname=wf.name, origin=wf.origin, file_hash=wf.sha256, cache_dir=cache_dir))
        except Exception as exc:  # get_file wraps URLError, HTTPError, hash mismatch alike
            raise WeightsError(
                f"model.weights: pretrained: could not get {wf.name} ({type(exc).__name__}: "
                f"{exc}). Offline? {_download_hint(cache_dir)}") from None
    return paths


def find_local(folder: str | Path, components=COMPONENTS) -> dict[str, Path]:
    """Each component's file in ``folder``: Keras 3 ``.weights.h5`` form first, else KerasCV's."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise WeightsError(f"model.weights: local:{folder}: folder not found")
    paths, missing = {}, []
    for name in components:
        wf = WEIGHT_FILES[name]
        found = [folder / n for n in (wf.keras3_name, wf.name) if (folder / n).is_file()]
        if found:
            paths[name] = found[0]
        else:
            missing.append(f"{wf.keras3_name} (or {wf.name})")
    if missing:
        raise WeightsError(f"model.weights: local:{folder}: missing {', '.join(missing)}")
    return paths


def fingerprint(paths: dict[str, Path]) -> str:
    """A short content id of weight files: sizes plus the first and last MiB of each.

    Hashing 3.4 GB of U-Net on every start would cost seconds for no gain: a different set of
    weights differs in its size or its first or last megabyte.
    """
    h = hashlib.sha256()
    for name in sorted(paths):
        p = paths[name]
        size = p.stat().st_size
        h.update(f"{name}:{size}:".encode())
        with p.open("rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def resolve_weights(spec: str, components=COMPONENTS, cache_dir: str | None = None,
                    seed: int = 0) -> WeightsSource:
    """Turn ``model.weights`` into files (or random init), failing early with a clear message."""
    if spec == "random":
        return WeightsSource("random", spec, id=f"random-init(seed={seed})")
    if spec.startswith("local:"):
        files = find_local(spec[len("local:"):], components)
        return WeightsSource("local", spec, files, id=f"local:{fingerprint(files)}")
    if spec in ("pretrained", "auto"):
        try:
            files = fetch_pretrained(components, cache_dir)
        except WeightsError as exc:
            if spec == "pretrained":
                raise
            warnings.warn(
                "\n" + "!" * 78 + "\nmodel.weights: auto: pretrained Stable Diffusion weights are "
                "not cached and could not be downloaded, so this run uses RANDOM-INIT weights. "
                "Its images and scores mean nothing about fashion; every output is labelled so.\n"
                f"{exc}\n" + "!" * 78, stacklevel=2)
            return WeightsSource("random", spec, id=f"random-init(seed={seed})")
        return WeightsSource("pretrained", spec, files, id=PRETRAINED_ID)
    raise WeightsError(f"model.weights: {spec!r}: use pretrained, local:DIR, random or auto")


# --------------------------------------------------------------------------------------------


@dataclass
class Components:
    """The parts of Stable Diffusion a job needs; the others stay None (they cost memory)."""

    source: WeightsSource
    resolution: int | list[int]  # pixels: a square, or [width, height]
    diffusion_model: keras.Model | None = None
    text_encoder: keras.Model | None = None
    image_encoder: keras.Model | None = None
    decoder: keras.Model | None = None

    @property
    def tokenizer(self):
        return clip_tokenizer()


def build_component(name: str, resolution: int, path: Path | None = None,
                    attention: str = "fused") -> keras.Model:
    """One component, with weights from ``path`` or left at random init.

    The U-Net computes its attention as ``attention`` says (:mod:`fashion_sd.sd.attention`):
    ``fused`` (default) or written out as KerasCV did; the weights are the same either way.
    """
    if keras.backend.backend() == "jax":
        from fashion_sd.sd import jax_compiles

        jax_compiles.prepare()  # before the networks' first compile
    w, h = image_size(resolution)
    if name == "diffusion_model":
        model = DiffusionModel(h, w, MAX_LENGTH, attention=attention)
    elif name == "text_encoder":
        model = TextEncoder(MAX_LENGTH)
    elif name == "image_encoder":
        model = ImageEncoder()
    elif name == "decoder":
        model = Decoder(h, w)
    else:
        raise ValueError(f"unknown component {name!r}; use one of {', '.join(COMPONENTS)}")
    if path is not None:
        try:
            model.load_weights(str(path))
        except Exception as exc:
            raise WeightsError(f"{path}: cannot load it into SD 1.x's {type(model).__name__} "
                               f"({type(exc).__name__}: {exc})") from None
    return model


def build_components(source: WeightsSource, resolution: int, which=COMPONENTS) -> Components:
    """Build the ``which`` components at ``resolution`` px with weights from ``source``.

    For random init, call ``keras.utils.set_random_seed`` first to make the weights reproducible.
    Set the dtype policy (mixed precision) before calling: layers take it when built.
    """
    if not valid_size(resolution):
        raise ValueError(f"resolution {resolution} is not a multiple of 64")
    comps = Components(source, resolution)
    for name in which:
        path = None if source.is_random else source.files[name]
        log.info("building %s (%s)", name, path or "random init")
        setattr(comps, name, build_component(name, resolution, path))
    return comps


def save_components(comps: Components, folder: str | Path) -> Path:
    """Write each built component as ``<KerasCV name>.weights.h5`` plus ``source.json``.

    The folder loads back with ``model.weights: local:DIR``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    saved = {}
    for name in COMPONENTS:
        model = getattr(comps, name)
        if model is not None:
            path = folder / WEIGHT_FILES[name].keras3_name
            tmp = path.with_name(".tmp-" + path.name)  # Keras insists on the .weights.h5 suffix
            model.save_weights(str(tmp))
            tmp.replace(path)
            saved[name] = path.name
    atomic_write_text(folder / "source.json", json.dumps(
        {"origin": comps.source.to_dict(), "components": saved}, indent=2) + "\n")
    return folder
