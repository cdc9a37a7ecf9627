"""An SD 1.x source on disk (a diffusers folder or a CompVis single file) as diffusers-named parts.

:func:`open_source` recognises the layout, refuses SD 2.x / SDXL / other models by name, and
returns one tensor source per KerasCV component (``diffusion_model``, ``text_encoder``,
``image_encoder``, ``decoder``) whose keys are diffusers' names. Every tensor of the files is
accounted for: it belongs to one component, or it is a known non-weight (a noise-schedule buffer,
``position_ids``, the EMA copy not chosen, the VAE's training-only discriminator) listed in
``skipped``; anything else is an error that names it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from fashion_sd.interop import keys as K
from fashion_sd.interop.tensors import PICKLE_SUFFIXES, InteropError, Tensors

SD1_CONTEXT = 768
# diffusers' subfolder for each KerasCV component (the VAE serves two of them).
SUBFOLDERS = {"diffusion_model": "unet", "text_encoder": "text_encoder",
              "image_encoder": "vae", "decoder": "vae"}


class Renamed:
    """Tensors seen under new names: ``names`` maps new name -> name in ``tensors``."""

    def __init__(self, tensors: Tensors, names: dict[str, str]):
        self.tensors, self.names = tensors, names

    def keys(self):
        return self.names.keys()

    def shape(self, name):
        return self.tensors.shape(self.names[name])

    def __getitem__(self, name):
        return self.tensors[self.names[name]]

    def dtypes(self) -> set[str]:
        return {self.tensors.dtype(n) for n in self.names.values()}


@dataclass
class Source:
    path: Path
    layout: str  # "diffusers" | "compvis"
    files: list[Path]
    parts: dict[str, Renamed]  # component -> its tensors under diffusers' names
    skipped: dict[str, list[str]] = field(default_factory=dict)  # why -> original names


def _refuse(path: Path, what: str, why: str):
    raise InteropError(f"{path}: this is {what} ({why}); fashion-sd's KerasCV model is Stable "
                       "Diffusion 1.x only (v1.4, v1.5 and their fine-tunes)")


# --------------------------------------------------------------------------------------------
# CompVis single file


def _open_single_file(path: Path, ema: bool) -> Source:
    if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        raise InteropError(f"{path}: expected a .safetensors or .ckpt file, or a diffusers folder")
    t = Tensors([path])
    names = t.keys()
    if any(n.startswith("conditioner.embedders.") for n in names):
        _refuse(path, "an SDXL checkpoint", "it has conditioner.embedders.*")
    if any(n.startswith("cond_stage_model.model.") for n in names):
        _refuse(path, "a Stable Diffusion 2.x checkpoint", "its text encoder is OpenCLIP, "
                "cond_stage_model.model.*")
    k = K.UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if k in names and t.shape(k)[-1] != SD1_CONTEXT:
        _refuse(path, "not an SD 1.x checkpoint", f"its cross-attention reads {t.shape(k)[-1]}-wide "
                "text features, SD 1.x reads 768 (SD 2.x: 1024)")
    parts = defaultdict(dict)
    skipped = defaultdict(list)
    unmapped = []
    has_ema = any(n.startswith(K.EMA_PREFIX) and n not in K.SCHEDULE_BUFFERS for n in names)
    if ema and not has_ema:
        raise InteropError(f"{path}: --ema, but this file has no EMA weights (model_ema.*); "
                           "import it without --ema")
    ema_names = {}
    for n in names:
        if n in K.SCHEDULE_BUFFERS:
            skipped["noise-schedule buffers and EMA counters (not weights)"].append(n)
        elif n.startswith(K.UNET_PREFIX):
            d = K.compvis_unet_key(n[len(K.UNET_PREFIX):])
            if d is None:
                unmapped.append(n)
            elif ema:
                ema_names[K.ema_key(n[len(K.UNET_PREFIX):])] = d
                skipped["U-Net weights replaced by their EMA copy (--ema)"].append(n)
            else:
                parts["diffusion_model"][d] = n
        elif n.startswith(K.VAE_PREFIX):
            rest = n[len(K.VAE_PREFIX):]
            d = K.compvis_vae_key(rest)
            if rest.startswith("loss."):
                skipped["the VAE's training loss and discriminator"].append(n)
            elif d is None:
                unmapped.append(n)
            else:
                parts["image_encoder" if d.startswith(("encoder.", "quant_conv."))
                      else "decoder"][d] = n
        elif n.startswith(K.CLIP_PREFIX):
            d = K.compvis_clip_key(n[len(K.CLIP_PREFIX):])
            if d.endswith("position_ids"):
                skipped["position ids (a buffer: 0..76)"].append(n)
            else:
                parts["text_encoder"][d] = n
        elif not n.startswith(K.EMA_PREFIX):
            unmapped.append(n)
    for n in names:
        if n.startswith(K.EMA_PREFIX) and n not in K.SCHEDULE_BUFFERS:
            if not ema:
                skipped["EMA copy of the U-Net (import it with --ema)"].append(n)
            elif n in ema_names:
                parts["diffusion_model"][ema_names.pop(n)] = n
            else:
                unmapped.append(n)
    if ema and ema_names:
        missing = sorted(ema_names)
        raise InteropError(f"{path}: --ema, but {len(missing)} U-Net tensors have no EMA copy, "
                           f"e.g. {missing[0]}")
    if unmapped:
        raise InteropError(f"{path}: {len(unmapped)} tensors belong to no SD 1.x component: "
                           f"{', '.join(sorted(unmapped)[:8])}" + (" ..." if len(unmapped) > 8 else ""))
    return Source(path, "compvis", [path], {c: Renamed(t, m) for c, m in parts.items()},
                  dict(skipped))


# --------------------------------------------------------------------------------------------
# diffusers folder


def _weight_files(folder: Path) -> list[Path]:
    """The weights of one diffusers subfolder: safetensors over pickles, full precision over fp16."""
    for pattern in ("*.safetensors.index.json", "*.bin.index.json"):
        for index in sorted(folder.glob(pattern)):
            if ".fp16." not in index.name or len(list(folder.glob(pattern))) == 1:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                return [folder / s for s in shards]
    for suffix in (".safetensors",) + PICKLE_SUFFIXES:
        files = sorted(folder.glob(f"*{suffix}"))
        if files:
            full = [f for f in files if ".fp16." not in f.name]
            return [(full or files)[0]]
    return []


def _open_folder(path: Path, ema: bool) -> Source:
    index = path / "model_index.json"
    cls = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    if "XL" in cls or (path / "text_encoder_2").is_dir():
        _refuse(path, "an SDXL pipeline", f"model_index.json says {cls or 'text_encoder_2/'}")
    unet_dir = path / ("unet_ema" if ema else "unet")
    if ema and not unet_dir.is_dir():
        raise InteropError(f"{path}: --ema, but there is no unet_ema/ folder; import without --ema")
    if not (path / "unet").is_dir() and (path / "transformer").is_dir():
        _refuse(path, "a transformer-based pipeline", "transformer/ instead of unet/")
    config = unet_dir / "config.json"
    if config.is_file():
        cross = json.loads(config.read_text()).get("cross_attention_dim")
        if cross not in (None, SD1_CONTEXT):
            what = "a Stable Diffusion 2.x model" if cross == 1024 else "not an SD 1.x model"
            _refuse(path, what, f"unet/config.json: cross_attention_dim {cross}, SD 1.x has 768")
    parts, skipped, files = {}, defaultdict(list), []
    for comp in ("diffusion_model", "text_encoder", "image_encoder"):
        folder = unet_dir if comp == "diffusion_model" else path / SUBFOLDERS[comp]
        found = _weight_files(folder) if folder.is_dir() else []
        if not found:
            continue
        t = Tensors(found)
        files += found
        if comp == "image_encoder":  # one VAE file, two KerasCV components
            enc, dec = {}, {}
            for n in t.keys():
                d = K.diffusers_vae_key(n)
                (enc if d.startswith(("encoder.", "quant_conv.")) else dec)[d] = n
            parts["image_encoder"], parts["decoder"] = Renamed(t, enc), Renamed(t, dec)
        elif comp == "text_encoder":
            names = {}
            for n in t.keys():
                if n.endswith("position_ids"):
                    skipped["position ids (a buffer: 0..76)"].append(n)
                else:  # transformers >= 5.6 saves CLIPTextModel without the text_model. level
                    names[K.compvis_clip_key(n)] = n
            parts[comp] = Renamed(t, names)
        else:
            parts[comp] = Renamed(t, {n: n for n in t.keys()})
    if not parts:
        raise InteropError(f"{path}: no weights found in unet/, vae/ or text_encoder/ (a diffusers "
                           "folder has diffusion_pytorch_model.safetensors or .bin in each)")
    return Source(path, "diffusers", files, parts, dict(skipped))


def open_source(path: str | Path, ema: bool = False) -> Source:
    path = Path(path).expanduser()
    if path.is_dir():
        return _open_folder(path, ema)
    if path.is_file():
        return _open_single_file(path, ema)
    raise InteropError(f"{path}: not found (give a diffusers folder or a .safetensors file)")
