"""Where Stable Diffusion v1.4's weights come from (``model.weights``), found and checked without
Keras: a run's checks name a missing folder or file before TensorFlow or JAX loads.

- ``pretrained``: KerasCV's published v1.4 files, downloaded once and cached by
  ``keras.utils.get_file`` with their sha256 (the same cache KerasCV itself uses, so a file already
  fetched by KerasCV is reused). Offline without a cache: an error at start that says what to do.
- ``local:DIR``: the same files from a folder, either KerasCV's published ``.h5`` names or their
  Keras 3 ``.weights.h5`` form (what :func:`fashion_sd.sd.models.save_components` writes).
- ``random``: untrained weights, for tests and plumbing checks; every output says so.
- ``auto`` (demo only): pretrained when cached or downloadable, else random with a loud warning.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from fashion_sd.errors import FashionSDError

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
        import keras  # noqa: PLC0415 - a download needs Keras' cache; the checks need none

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
