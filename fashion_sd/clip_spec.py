"""What ``eval.clip`` and ``eval.clip_preset`` may say, checked without loading anything: the
published CLIP architectures and the folders ``local:DIR`` and ``hf:DIR`` name. Standard library
only, so config validation and every command's checks stay light; :mod:`fashion_sd.evaluation.clip`
loads the model.
"""

from __future__ import annotations

from pathlib import Path

from fashion_sd.errors import FashionSDError

# The published CLIP architectures (OpenAI's model cards; the same numbers are in each Kaggle
# preset's config.json): random init of a preset needs them without the network.
ARCHITECTURES = {
    "clip-vit-base-patch16": dict(embed_dim=512, image_resolution=224, vision_layers=12,
                                  vision_width=768, vision_patch_size=16, transformer_width=512,
                                  transformer_heads=8, transformer_layers=12),
    "clip-vit-base-patch32": dict(embed_dim=512, image_resolution=224, vision_layers=12,
                                  vision_width=768, vision_patch_size=32, transformer_width=512,
                                  transformer_heads=8, transformer_layers=12),
    "clip-vit-large-patch14": dict(embed_dim=768, image_resolution=224, vision_layers=24,
                                   vision_width=1024, vision_patch_size=14, transformer_width=768,
                                   transformer_heads=12, transformer_layers=12),
    "clip-vit-large-patch14-336": dict(embed_dim=768, image_resolution=336, vision_layers=24,
                                       vision_width=1024, vision_patch_size=14,
                                       transformer_width=768, transformer_heads=12,
                                       transformer_layers=12),
}


class ClipUnavailable(FashionSDError, RuntimeError):
    """The CLIP weights asked for cannot be loaded; the message says what to download."""


def _folder(spec: str) -> Path:
    return Path(spec.split(":", 1)[1]).expanduser()


def check_spec(spec: str, key: str = "eval.clip") -> None:
    """What can be checked without loading: a local:DIR preset folder or an hf:DIR transformers
    folder exists with its config (and, for hf:, its safetensors weights)."""
    if spec.startswith("local:"):
        folder = _folder(spec)
        if not (folder / "config.json").is_file():
            raise ClipUnavailable(f"{key}: {spec}: no config.json in {folder}; give a keras-hub CLIP "
                                  "preset folder (config.json + model.weights.h5), or set "
                                  f"{key}: auto or none")
    elif spec.startswith("hf:"):
        folder = _folder(spec)
        if not (folder / "config.json").is_file():
            raise ClipUnavailable(f"{key}: {spec}: no config.json in {folder}; give the folder a "
                                  "transformers CLIPModel was saved to (save_pretrained, or a "
                                  "snapshot of e.g. openai/clip-vit-large-patch14), or set "
                                  f"{key}: auto or none")
        if not list(folder.glob("*.safetensors")):
            raise ClipUnavailable(f"{key}: {spec}: no .safetensors weights in {folder} (a "
                                  "pytorch_model.bin is not read: it needs torch); download "
                                  "model.safetensors too")


def check_dinov2_spec(spec: str, key: str = "eval.dinov2") -> None:
    """``eval.dinov2`` before any work: auto, none, a transformers folder that holds a
    config.json, or a Hub name (OWNER/NAME, fetched when used)."""
    if spec in ("auto", "none"):
        return
    target = spec.split(":", 1)[1] if spec.startswith("hf:") else ""
    folder = Path(target).expanduser()
    looks_like_path = target.startswith(("/", ".", "~")) or target.count("/") != 1
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ClipUnavailable(f"{key}: {spec}: no config.json in {folder}; give the folder "
                                  "transformers' Dinov2Model.save_pretrained wrote")
    elif folder.exists() or (target and looks_like_path) or not target:
        raise ClipUnavailable(f"{key}: {spec}: no such folder; give hf:DIR (a transformers "
                              "Dinov2Model folder), hf:OWNER/NAME, auto or none")

