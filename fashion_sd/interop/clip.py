"""A transformers CLIP folder (``CLIPModel``: OpenAI's ViT-L/14, FashionCLIP, ...) as KerasCV's CLIP.

``eval.clip: hf:DIR`` judges with any CLIP saved by transformers' ``save_pretrained`` (a
``config.json`` and ``model.safetensors``, or its sharded form). The tensors are read with our
safetensors reader, so no torch is needed at run time; the converted model is written once as a
KerasCV preset folder in ``DIR/kerascv-clip/`` (:func:`cached_preset`) and loaded from there on
later runs, as ``eval.clip: local:DIR`` would.

KerasCV's CLIP fixes what transformers leaves to the config: QuickGELU, MLP width 4x, vision
heads of 64 channels, LayerNorm epsilon 1e-5, 77 positions and OpenAI's 49,408-token vocabulary
(our tokenizer's). A config outside that is refused with the field that differs.

The mapping walks KerasCV's layers by attribute (as :mod:`fashion_sd.interop.kerascv` does for
Stable Diffusion) and every pairing is checked for shape before any tensor is assigned.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fashion_sd.sd.kerascv_clip import clip_class, repair, save_clip
from fashion_sd.interop.checkpoint import Renamed, _weight_files
from fashion_sd.interop.kerascv import Target, _dense, _norm, assign
from fashion_sd.interop.tensors import InteropError, Tensors

CACHE_NAME = "kerascv-clip"
CONVERTER_VERSION = 1  # a cache made by another version is converted again
# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for fields a config.json leaves out.
_TEXT = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12,
             vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
             layer_norm_eps=1e-5)
_VISION = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
               image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
               num_channels=3)
# What KerasCV's CLIP can hold: (field, required value as a function of the section).
_FIXED = {"vocab_size": lambda c: 49408, "max_position_embeddings": lambda c: 77,
          "hidden_act": lambda c: "quick_gelu", "layer_norm_eps": lambda c: 1e-5,
          "intermediate_size": lambda c: 4 * c["hidden_size"], "num_channels": lambda c: 3}
_SKIPPED = ("position_ids",)  # buffers (0..n-1) older transformers saved with the weights


def _section(config: dict, name: str, defaults: dict) -> dict:
    given = config.get(f"{name}_config") or config.get(f"{name}_config_dict") or {}
    return {**defaults, **{k: v for k, v in given.items() if k in defaults}}


def keras_arguments(folder: str | Path) -> dict:
    """KerasCV ``CLIP(**arguments)`` for the transformers CLIP in ``folder``; refuses a config
    KerasCV's CLIP cannot represent, naming the field."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InteropError(f"{path}: not a readable transformers config ({exc}); give the folder "
                           "that save_pretrained wrote (config.json + model.safetensors)") from None
    if not isinstance(config, dict) or config.get("model_type", "clip") != "clip":
        raise InteropError(f"{path}: model_type {config.get('model_type')!r} is not a CLIPModel")
    text, vision = _section(config, "text", _TEXT), _section(config, "vision", _VISION)
    for name, section in (("text_config", text), ("vision_config", vision)):
        for field, wanted in _FIXED.items():
            if field in section and section[field] != wanted(section):
                raise InteropError(f"{path}: {name}.{field} is {section[field]!r}; KerasCV's CLIP "
                                   f"has {wanted(section)!r}, so this CLIP cannot be converted")
    if vision["num_attention_heads"] * 64 != vision["hidden_size"]:
        raise InteropError(f"{path}: vision_config has {vision['num_attention_heads']} heads of "
                           f"{vision['hidden_size']} channels; KerasCV's CLIP uses heads of 64")
    return dict(embed_dim=int(config.get("projection_dim", 512)),
                image_resolution=int(vision["image_size"]),
                vision_layers=int(vision["num_hidden_layers"]),
                vision_width=int(vision["hidden_size"]),
                vision_patch_size=int(vision["patch_size"]),
                transformer_width=int(text["hidden_size"]),
                transformer_heads=int(text["num_attention_heads"]),
                transformer_layers=int(text["num_hidden_layers"]))


def _tensors(folder: Path):

    files = _weight_files(folder)
    if not files or any(f.suffix != ".safetensors" for f in files):
        raise InteropError(f"{folder}: no model.safetensors (found {[f.name for f in files]}); "
                           "save the model with save_pretrained(..., safe_serialization=True) "
                           "or convert its .bin to safetensors: read without torch, it must be")
    return Tensors(files)


def _blocks(prefix: str, encoder) -> list:

    out = []
    for i, block in enumerate(encoder.resblocks):
        p = f"{prefix}.encoder.layers.{i}"
        out += _norm(f"{p}.layer_norm1", block.ln_1) + _norm(f"{p}.layer_norm2", block.ln_2)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += _dense(f"{p}.self_attn.{proj}", getattr(block.attn, proj))
        out += _dense(f"{p}.mlp.fc1", block.mlp_dense_1) + _dense(f"{p}.mlp.fc2", block.mlp_dense_2)
    return out


def clip_targets(model) -> list:
    """Every variable of a KerasCV ``CLIP`` with the transformers tensor that fills it."""

    image, text = model.image_encoder, model.text_encoder
    emb = image.embeddings
    return ([Target("vision_model.embeddings.patch_embedding.weight", emb.conv1.kernel, "conv"),
             Target("vision_model.embeddings.class_embedding", emb.class_embedding, "same"),
             Target("vision_model.embeddings.position_embedding.weight",
                    emb.positional_embedding, "same")]
            + _norm("vision_model.pre_layrnorm", image.pre_norm)  # transformers' spelling
            + _blocks("vision_model", image.encoder)
            + _norm("vision_model.post_layernorm", image.post_norm)
            + _dense("visual_projection", image.image_projector, bias=False)
            + [Target("text_model.embeddings.token_embedding.weight",
                      text.token_embedding.embeddings, "same"),
               Target("text_model.embeddings.position_embedding.weight",
                      text.positional_embedding.embeddings, "same")]
            + _blocks("text_model", text.encoder)
            + _norm("text_model.final_layer_norm", text.ln_final)
            + _dense("text_projection", text.text_projector, bias=False)
            + [Target("logit_scale", model.clip_head.logit_scale, "same")])


def convert(folder: str | Path):
    """The transformers CLIP in ``folder`` as a KerasCV ``CLIP`` (float32), every tensor checked."""

    folder = Path(folder).expanduser()
    arguments = keras_arguments(folder)
    tensors = _tensors(folder)  # without its buffers: they are not weights
    source = Renamed(tensors, {n: n for n in tensors.keys() if not n.endswith(_SKIPPED)})
    model = repair(clip_class()(**arguments))
    assign(clip_targets(model), source, f"{folder} (transformers CLIP)")
    return model


def _fingerprint(folder: Path) -> dict:
    """What the cache was made from: the weight files' names, sizes and mtimes, and the config."""

    files = [folder / "config.json"] + _weight_files(folder)
    return {"converter": CONVERTER_VERSION,
            **{f.name: [f.stat().st_size, int(f.stat().st_mtime)] for f in files if f.is_file()}}


def cached_preset(folder: str | Path) -> Path:
    """The KerasCV preset folder converted from ``folder`` (``folder/kerascv-clip``), made on first
    use and again whenever the source files change; written to a temporary folder and renamed,
    so an interrupted conversion never leaves a half-written cache."""

    folder = Path(folder).expanduser()
    cache, stamp = folder / CACHE_NAME, folder / CACHE_NAME / "source.json"
    fingerprint = _fingerprint(folder)
    if stamp.is_file() and json.loads(stamp.read_text()) == fingerprint:
        return cache
    keras_arguments(folder)  # refuse a bad config before reading any tensor
    tmp = folder / f".{CACHE_NAME}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_clip(convert(folder), tmp)
        (tmp / "source.json").write_text(json.dumps(fingerprint, indent=1))
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InteropError(f"{folder}: cannot write the converted CLIP to {cache} ({exc}); make the "
                           "folder writable or convert on a machine where it is") from None
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    print(f"Converted the transformers CLIP in {folder} to KerasCV's ({cache})")
    return cache
