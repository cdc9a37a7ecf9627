"""A transformers CLIP folder (``CLIPModel``: OpenAI's ViT-L/14, FashionCLIP, ...) as keras-hub's
``CLIPBackbone``.

``eval.clip: hf:DIR`` judges with any CLIP saved by transformers' ``save_pretrained`` (a
``config.json`` and ``model.safetensors``, or its sharded form). The tensors are read with our
safetensors reader, so no torch is needed at run time; the converted model is written once as a
keras-hub preset folder in ``DIR/keras-hub-clip/`` (:func:`cached_preset`) and loaded from there
on later runs, as ``eval.clip: local:DIR`` would. keras-hub 0.32 has no transformers converter
for CLIP (its ``from_preset`` reads transformers folders of other models only), hence this one.

keras-hub's CLIP takes widths, heads and the activation as arguments, so only what it or our
tokenizer fixes is refused, naming the field: LayerNorm epsilon 1e-5, 77 positions, OpenAI's
49,408-token vocabulary (our tokenizer's), RGB, and QuickGELU or exact GELU.

The mapping walks keras-hub's layers by attribute; every pairing is checked for shape before any
tensor is assigned, and every variable of the backbone must be filled (the vision position ids,
0..n-1 by definition, are set by :func:`fashion_sd.sd.hub_clip.build`).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from fashion_sd.sd import hub_clip
from fashion_sd.interop.checkpoint import Renamed, _weight_files
from fashion_sd.interop.kerascv import Target, _norm, assign
from fashion_sd.interop.tensors import InteropError, Tensors

CACHE_NAME = "keras-hub-clip"
KERASCV_CACHE = "kerascv-clip"  # converter version 1's KerasCV preset, removed once replaced
CONVERTER_VERSION = 2  # a cache made by another version (or keras-hub) is converted again
# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for fields a config.json leaves out.
_TEXT = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12,
             vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
             layer_norm_eps=1e-5)
_VISION = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
               image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
               num_channels=3)
# What keras-hub's CLIP (or our tokenizer) fixes: field -> the values it can hold. Keras' "gelu"
# is the exact (erf) GELU, transformers' "gelu" too.
_FIXED = {"vocab_size": (49408,), "max_position_embeddings": (77,), "layer_norm_eps": (1e-5,),
          "num_channels": (3,), "hidden_act": ("quick_gelu", "gelu")}
_SKIPPED = ("position_ids",)  # buffers (0..n-1) older transformers saved with the weights


def _section(config: dict, name: str, defaults: dict) -> dict:
    given = config.get(f"{name}_config") or config.get(f"{name}_config_dict") or {}
    return {**defaults, **{k: v for k, v in given.items() if k in defaults}}


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InteropError(f"{path}: not a readable transformers config ({exc}); give the folder "
                           "that save_pretrained wrote (config.json + model.safetensors)") from None
    if not isinstance(config, dict) or config.get("model_type", "clip") != "clip":
        raise InteropError(f"{path}: model_type {config.get('model_type')!r} is not a CLIPModel")
    return config


def _encoder(section: dict) -> dict:
    """The arguments both keras-hub encoders share, from a transformers config section."""
    return dict(hidden_dim=int(section["hidden_size"]), num_layers=int(section["num_hidden_layers"]),
                num_heads=int(section["num_attention_heads"]),
                intermediate_dim=int(section["intermediate_size"]),
                intermediate_activation=section["hidden_act"])


def hub_arguments(folder: str | Path) -> dict:
    """:func:`fashion_sd.sd.hub_clip.build`'s arguments for the transformers CLIP in ``folder``;
    refuses a config keras-hub's CLIP cannot represent, naming the field."""
    path = Path(folder) / "config.json"
    config = _read_config(path)
    text, vision = _section(config, "text", _TEXT), _section(config, "vision", _VISION)
    for name, section in (("text_config", text), ("vision_config", vision)):
        for field, allowed in _FIXED.items():
            if field in section and section[field] not in allowed:
                raise InteropError(f"{path}: {name}.{field} is {section[field]!r}; keras-hub's CLIP "
                                   f"(with our tokenizer) takes {' or '.join(map(repr, allowed))}, "
                                   "so this CLIP cannot be converted")
    size = int(vision["image_size"])
    return {"projection_dim": int(config.get("projection_dim", 512)),
            "vision": dict(_encoder(vision), patch_size=int(vision["patch_size"]),
                           image_shape=(size, size, 3)),
            "text": dict(_encoder(text), vocabulary_size=int(text["vocab_size"]),
                         embedding_dim=int(text["hidden_size"]),
                         max_sequence_length=int(text["max_position_embeddings"]))}


def _tensors(folder: Path):

    files = _weight_files(folder)
    if not files or any(f.suffix != ".safetensors" for f in files):
        raise InteropError(f"{folder}: no model.safetensors (found {[f.name for f in files]}); "
                           "save the model with save_pretrained(..., safe_serialization=True) "
                           "or convert its .bin to safetensors: read without torch, it must be")
    return Tensors(files)


class _Flat:
    """A keras-hub attention variable seen in the shape of a transformers Linear tensor
    (transposed): Keras' MultiHeadAttention keeps its kernels per head, (in, heads, head) and
    (heads, head, out), and its q/k/v biases as (heads, head); transformers has one matrix and
    one vector. Torch splits the heads off the output features in row-major order, which a
    reshape reproduces."""

    def __init__(self, variable, split: int):
        shape = tuple(variable.shape)
        self.variable = variable
        self.shape = ((math.prod(shape[:split]), math.prod(shape[split:])) if split
                      else (math.prod(shape),))

    def assign(self, value) -> None:
        self.variable.assign(value.reshape(tuple(self.variable.shape)))


def _linear(prefix: str, layer, split: int | None = None, bias: bool = True) -> list:
    """A Dense (or, with ``split``, an EinsumDense of the attention) and its transformers Linear."""
    kernel = layer.kernel if split is None else _Flat(layer.kernel, split)
    out = [Target(f"{prefix}.weight", kernel, "linear")]
    if bias:
        flat = split == 1  # the q/k/v biases are per head too; the output's is not
        out.append(Target(f"{prefix}.bias", _Flat(layer.bias, 0) if flat else layer.bias, "same"))
    return out


def _blocks(prefix: str, encoder) -> list:
    out = []
    for i, block in enumerate(encoder.encoder_layers):
        p, attention = f"{prefix}.encoder.layers.{i}", block.attention
        out += _norm(f"{p}.layer_norm1", block.layer_norm_1) + _norm(f"{p}.layer_norm2",
                                                                       block.layer_norm_2)
        for name, dense in (("q_proj", attention.query_dense), ("k_proj", attention.key_dense),
                            ("v_proj", attention.value_dense)):
            out += _linear(f"{p}.self_attn.{name}", dense, split=1)
        out += _linear(f"{p}.self_attn.out_proj", attention.output_dense, split=2)
        out += _linear(f"{p}.mlp.fc1", block.dense_1) + _linear(f"{p}.mlp.fc2", block.dense_2)
    return out


def clip_targets(backbone) -> list:
    """Every variable of a keras-hub ``CLIPBackbone`` with the transformers tensor that fills it
    (all but the vision position ids)."""

    image, text = backbone.vision_encoder, backbone.text_encoder
    emb = image.embedding
    return ([Target("vision_model.embeddings.patch_embedding.weight", emb.patch_embedding.kernel,
                    "conv"),
             Target("vision_model.embeddings.class_embedding", emb.class_embedding, "same"),
             Target("vision_model.embeddings.position_embedding.weight",
                    emb.position_embedding.embeddings, "same")]
            + _norm("vision_model.pre_layrnorm", image.pre_layer_norm)  # transformers' spelling
            + _blocks("vision_model", image)
            + _norm("vision_model.post_layernorm", image.layer_norm)
            + _linear("visual_projection", backbone.vision_projection, bias=False)
            + [Target("text_model.embeddings.token_embedding.weight",
                      text.embedding.token_embedding.embeddings, "same"),
               Target("text_model.embeddings.position_embedding.weight",
                      text.embedding.position_embedding.position_embeddings, "same")]
            + _blocks("text_model", text)
            + _norm("text_model.final_layer_norm", text.layer_norm)
            + _linear("text_projection", backbone.text_projection, bias=False)
            + [Target("logit_scale", backbone.clip_head.logit_scale, "same")])


def _unfilled(backbone, targets: list) -> list[str]:
    """The backbone's variables no target fills (besides the position ids): a mapping bug."""
    filled = {id(getattr(t.variable, "variable", t.variable)) for t in targets}
    filled.add(id(backbone.vision_encoder.embedding.position_ids))
    return [v.path for v in backbone.weights if id(v) not in filled]


def convert(folder: str | Path):
    """The transformers CLIP in ``folder`` as keras-hub's ``CLIPBackbone`` (float32), every tensor
    checked and every variable filled."""

    folder = Path(folder).expanduser()
    backbone = hub_clip.build(hub_arguments(folder))
    tensors = _tensors(folder)  # without its buffers: they are not weights
    source = Renamed(tensors, {n: n for n in tensors.keys() if not n.endswith(_SKIPPED)})
    targets = clip_targets(backbone)
    unfilled = _unfilled(backbone, targets)
    if unfilled:
        raise RuntimeError(f"the CLIP mapping leaves keras-hub's {unfilled[:4]} unfilled")
    assign(targets, source, f"{folder} (transformers CLIP)")
    return backbone


def _fingerprint(folder: Path) -> dict:
    """What the cache was made from: the weight files' names, sizes and mtimes, the config, the
    converter's version and keras-hub's (whose preset format the cache is in)."""

    files = [folder / "config.json"] + _weight_files(folder)
    return {"converter": CONVERTER_VERSION, "keras_hub": hub_clip.keras_hub().__version__,
            **{f.name: [f.stat().st_size, int(f.stat().st_mtime)] for f in files if f.is_file()}}


def _remove_kerascv_cache(folder: Path) -> None:
    """Converter version 1's KerasCV preset (``folder/kerascv-clip``, as large as the model), once
    the keras-hub one replaces it; only a folder with its stamp, i.e. one the converter wrote."""

    old = folder / KERASCV_CACHE
    if (old / "source.json").is_file():
        shutil.rmtree(old, ignore_errors=True)
        print(f"Removed {old}, the KerasCV CLIP an older version converted (no longer read)")


def cached_preset(folder: str | Path) -> Path:
    """The keras-hub preset folder converted from ``folder`` (``folder/keras-hub-clip``), made on
    first use and again whenever the source files, the converter or keras-hub change; written to
    a temporary folder and renamed, so an interrupted conversion never leaves a half-written
    cache. A KerasCV cache (``kerascv-clip``, older versions') is never read."""

    folder = Path(folder).expanduser()
    cache, stamp = folder / CACHE_NAME, folder / CACHE_NAME / "source.json"
    fingerprint = _fingerprint(folder)
    if stamp.is_file() and json.loads(stamp.read_text()) == fingerprint:
        return cache
    hub_arguments(folder)  # refuse a bad config before reading any tensor
    tmp = folder / f".{CACHE_NAME}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hub_clip.save(convert(folder), tmp)
        (tmp / "source.json").write_text(json.dumps(fingerprint, indent=1))
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InteropError(f"{folder}: cannot write the converted CLIP to {cache} ({exc}); make the "
                           "folder writable or convert on a machine where it is") from None
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    print(f"Converted the transformers CLIP in {folder} to keras-hub's ({cache})")
    _remove_kerascv_cache(folder)
    return cache
