"""Where each diffusers tensor lives in KerasCV's SD 1.x components, found by walking their layers.

Keras lists a functional model's weights in topological order, which is not diffusers' order
(the second time-embedding Dense comes after ``conv_in``), so a flat zip of the two lists would
mis-assign tensors of equal shape. Instead each component is walked layer by layer: layers of one
type form a chain in the data flow (every ResBlock feeds the next), so their order is the order of
the blocks, and each block's parts are reached by attribute. Every pairing is then checked for
shape when it is used (:func:`assign`).

Layouts: a Dense kernel is a torch Linear weight transposed; a Conv2D kernel (H, W, I, O) is a
torch weight (O, I, H, W) transposed; the VAE's attention uses 1x1 convolutions where diffusers
has Linear layers, so a 2-D source becomes a (1, 1, I, O) kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from fashion_sd.interop.keys import unet_block_names
from fashion_sd.interop.tensors import InteropError
from fashion_sd.sd.padded_conv import PaddedConv2D
from fashion_sd.sd.text_encoder import CLIPEmbedding, CLIPEncoderLayer
from fashion_sd.sd.unet import ResBlock, SpatialTransformer, Upsample
from fashion_sd.sd.vae import AttentionBlock, ResnetBlock


@dataclass
class Target:
    source: str  # diffusers tensor name
    variable: object  # the Keras variable it fills
    kind: str  # "linear" | "conv" | "same"


def to_keras(kind: str, value: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return value.T
    if kind == "conv":
        if value.ndim == 2:
            return value.T[None, None]
        return value.transpose(2, 3, 1, 0)
    return value


def from_keras(kind: str, value: np.ndarray, source_ndim: int | None = None) -> np.ndarray:
    """Inverse of :func:`to_keras`; ``source_ndim`` 2 asks for a Linear weight from a 1x1 conv."""
    if kind == "linear":
        return value.T
    if kind == "conv":
        if source_ndim == 2:
            return value[0, 0].T
        return value.transpose(3, 2, 0, 1)
    return value


def _dense(prefix: str, layer, bias: bool = True) -> list[Target]:
    out = [Target(f"{prefix}.weight", layer._kernel, "linear")]
    if bias:
        out.append(Target(f"{prefix}.bias", layer.bias, "same"))
    return out


def _conv(prefix: str, padded) -> list[Target]:
    conv = padded.conv2d
    return [Target(f"{prefix}.weight", conv.kernel, "conv"), Target(f"{prefix}.bias", conv.bias, "same")]


def _norm(prefix: str, layer) -> list[Target]:
    return [Target(f"{prefix}.weight", layer.gamma, "same"), Target(f"{prefix}.bias", layer.beta, "same")]


def _of_type(layers, cls) -> list:
    return [layer for layer in layers if type(layer) is cls]


def _expect(found: list, n: int, what: str, model) -> list:
    if len(found) != n:
        raise InteropError(f"KerasCV's {type(model).__name__} has {len(found)} {what}, expected {n}: "
                           "not the SD 1.x architecture this mapping knows (keras-cv 0.9.0)")
    return found


# --------------------------------------------------------------------------------------------
# U-Net


def unet_targets(model: keras.Model) -> list[Target]:

    names = unet_block_names()
    layers = model.layers
    out: list[Target] = []
    dense = _expect(_of_type(layers, keras.layers.Dense), 2, "top-level Dense layers", model)
    out += _dense("time_embedding.linear_1", dense[0]) + _dense("time_embedding.linear_2", dense[1])
    convs = _expect(_of_type(layers, PaddedConv2D), len(names["conv"]), "top-level convolutions", model)
    for name, layer in zip(names["conv"], convs):
        out += _conv(name, layer)
    norms = _expect(_of_type(layers, keras.layers.GroupNormalization), 1, "top-level GroupNorms", model)
    out += _norm("conv_norm_out", norms[0])
    for name, block in zip(names["res"], _expect(_of_type(layers, ResBlock), len(names["res"]),
                                                  "ResBlocks", model)):
        out += _norm(f"{name}.norm1", block.entry_flow[0]) + _conv(f"{name}.conv1", block.entry_flow[2])
        out += _dense(f"{name}.time_emb_proj", block.embedding_flow[1])
        out += _norm(f"{name}.norm2", block.exit_flow[0]) + _conv(f"{name}.conv2", block.exit_flow[2])
        if isinstance(block.residual_projection, PaddedConv2D):
            out += _conv(f"{name}.conv_shortcut", block.residual_projection)
    for name, st in zip(names["st"], _expect(_of_type(layers, SpatialTransformer), len(names["st"]),
                                              "SpatialTransformers", model)):
        out += _norm(f"{name}.norm", st.norm) + _conv(f"{name}.proj_in", st.proj1)
        tb, p = st.transformer_block, f"{name}.transformer_blocks.0"
        for i, attn in ((1, tb.attn1), (2, tb.attn2)):
            out += _norm(f"{p}.norm{i}", getattr(tb, f"norm{i}"))
            for proj in ("to_q", "to_k", "to_v"):
                out += _dense(f"{p}.attn{i}.{proj}", getattr(attn, proj), bias=False)
            out += _dense(f"{p}.attn{i}.to_out.0", attn.out_proj)
        out += _norm(f"{p}.norm3", tb.norm3)
        # Both halves of GEGLU's projection in one Dense: hidden first, gate second, as in diffusers.
        out += _dense(f"{p}.ff.net.0.proj", tb.geglu.dense) + _dense(f"{p}.ff.net.2", tb.dense)
        out += _conv(f"{name}.proj_out", st.proj2)
    for name, up in zip(names["ups"], _expect(_of_type(layers, Upsample), 3, "Upsamples", model)):
        out += _conv(name, up.conv)
    return out


# --------------------------------------------------------------------------------------------
# VAE: KerasCV's encoder and decoder are Sequential, so their layer list is the block order.


def _vae_res(prefix: str, block) -> list[Target]:

    out = _norm(f"{prefix}.norm1", block.norm1) + _conv(f"{prefix}.conv1", block.conv1)
    out += _norm(f"{prefix}.norm2", block.norm2) + _conv(f"{prefix}.conv2", block.conv2)
    if isinstance(block.residual_projection, PaddedConv2D):
        out += _conv(f"{prefix}.conv_shortcut", block.residual_projection)
    return out


def _vae_attn(prefix: str, block) -> list[Target]:
    out = _norm(f"{prefix}.group_norm", block.norm)
    for ours, theirs in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        out += _conv(f"{prefix}.{theirs}", getattr(block, ours))
    return out


def _sequential(model, names: list[str | None]) -> list[Target]:

    layers = [layer for layer in model.layers if layer.weights]
    _expect(layers, len(names), "layers with weights", model)
    out = []
    for name, layer in zip(names, layers):
        if isinstance(layer, ResnetBlock):
            out += _vae_res(name, layer)
        elif isinstance(layer, AttentionBlock):
            out += _vae_attn(name, layer)
        elif isinstance(layer, PaddedConv2D):
            out += _conv(name, layer)
        elif isinstance(layer, keras.layers.GroupNormalization):
            out += _norm(name, layer)
        else:
            raise InteropError(f"unexpected {type(layer).__name__} in KerasCV's {type(model).__name__}")
    return out


def image_encoder_names() -> list[str]:
    e = "encoder"
    names = [f"{e}.conv_in"]
    for b in range(4):
        names += [f"{e}.down_blocks.{b}.resnets.{j}" for j in range(2)]
        if b < 3:
            names.append(f"{e}.down_blocks.{b}.downsamplers.0.conv")
    names += [f"{e}.mid_block.resnets.0", f"{e}.mid_block.attentions.0", f"{e}.mid_block.resnets.1",
              f"{e}.conv_norm_out", f"{e}.conv_out", "quant_conv"]
    return names


def decoder_names() -> list[str]:
    d = "decoder"
    names = ["post_quant_conv", f"{d}.conv_in", f"{d}.mid_block.resnets.0",
             f"{d}.mid_block.attentions.0", f"{d}.mid_block.resnets.1"]
    for b in range(4):
        names += [f"{d}.up_blocks.{b}.resnets.{j}" for j in range(3)]
        if b < 3:
            names.append(f"{d}.up_blocks.{b}.upsamplers.0.conv")
    return names + [f"{d}.conv_norm_out", f"{d}.conv_out"]


def image_encoder_targets(model) -> list[Target]:
    return _sequential(model, image_encoder_names())


def decoder_targets(model) -> list[Target]:
    return _sequential(model, decoder_names())


# --------------------------------------------------------------------------------------------
# Text encoder (transformers' CLIPTextModel names)


def clip_layers(model) -> list:

    return _expect(_of_type(model.layers, CLIPEncoderLayer), 12, "CLIP encoder layers", model)


def text_encoder_targets(model) -> list[Target]:

    (emb,) = _expect(_of_type(model.layers, CLIPEmbedding), 1, "CLIP embeddings", model)
    out = [Target("text_model.embeddings.token_embedding.weight", emb.token_embedding.embeddings, "same"),
           Target("text_model.embeddings.position_embedding.weight",
                  emb.position_embedding.embeddings, "same")]
    for i, layer in enumerate(clip_layers(model)):
        p = f"text_model.encoder.layers.{i}"
        out += _norm(f"{p}.layer_norm1", layer.layer_norm1)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += _dense(f"{p}.self_attn.{proj}", getattr(layer.clip_attn, proj))
        out += _norm(f"{p}.layer_norm2", layer.layer_norm2)
        out += _dense(f"{p}.mlp.fc1", layer.fc1) + _dense(f"{p}.mlp.fc2", layer.fc2)
    (final,) = _expect(_of_type(model.layers, keras.layers.LayerNormalization), 1,
                       "final LayerNorms", model)
    return out + _norm("text_model.final_layer_norm", final)


TARGETS = {"diffusion_model": unet_targets, "text_encoder": text_encoder_targets,
           "image_encoder": image_encoder_targets, "decoder": decoder_targets}


# --------------------------------------------------------------------------------------------


def keras_shape(kind: str, shape: tuple) -> tuple:
    """The shape :func:`to_keras` gives a source tensor of ``shape``, without reading it."""
    shape = tuple(shape)
    if kind == "linear" and len(shape) == 2:
        return shape[::-1]
    if kind == "conv" and len(shape) == 2:
        return (1, 1, shape[1], shape[0])
    if kind == "conv" and len(shape) == 4:
        return (shape[2], shape[3], shape[1], shape[0])
    return shape


class DictSource:
    """A plain dict of arrays seen as a tensor source (what :func:`assign` reads)."""

    def __init__(self, tensors: dict):
        self.tensors = tensors

    def keys(self):
        return self.tensors.keys()

    def shape(self, name):
        return tuple(np.shape(self.tensors[name]))

    def __getitem__(self, name):
        return np.asarray(self.tensors[name])


def check(targets: list[Target], source, where: str) -> None:
    """Raise if ``source`` (keys / shape / getitem) does not fill ``targets`` with each tensor
    exactly once: unmapped, missing and mis-shaped tensors are listed together. Reads only names
    and shapes, so every component of a file is checked before anything is converted."""
    names = set(source.keys())
    wanted = [t.source for t in targets]
    if len(set(wanted)) != len(wanted):  # a bug in this mapping, not in the file
        raise RuntimeError("the KerasCV mapping uses a tensor twice")
    missing = [n for n in wanted if n not in names]
    unmapped = sorted(names - set(wanted))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {', '.join(missing[:6])}"
                        + (" ..." if len(missing) > 6 else ""))
    if unmapped:
        problems.append(f"{len(unmapped)} unmapped: {', '.join(unmapped[:6])}"
                        + (" ..." if len(unmapped) > 6 else ""))
    shaped = [f"{t.source} {source.shape(t.source)} (KerasCV expects {tuple(t.variable.shape)})"
              for t in targets if t.source in names
              and keras_shape(t.kind, source.shape(t.source)) != tuple(t.variable.shape)]
    if shaped:
        problems.append(f"{len(shaped)} mis-shaped: {'; '.join(shaped[:4])}"
                        + (" ..." if len(shaped) > 4 else ""))
    if problems:
        raise InteropError(f"{where}: tensors do not match SD 1.x: " + "; ".join(problems))


def assign(targets: list[Target], source, where: str) -> None:
    """Fill every target from ``source`` after :func:`check`, so a wrong file never leaves a
    half-converted model."""
    check(targets, source, where)
    for t in targets:
        t.variable.assign(np.asarray(to_keras(t.kind, source[t.source]), np.float32))


def state_dict(targets: list[Target]) -> dict[str, np.ndarray]:
    """The diffusers-named tensors of a KerasCV component (1x1 VAE attention as Linear)."""
    out = {}
    for t in targets:
        value = np.asarray(t.variable.numpy())
        linear_vae_attn = ".mid_block.attentions.0.to_" in t.source and t.source.endswith("weight")
        out[t.source] = np.ascontiguousarray(from_keras(t.kind, value, 2 if linear_vae_attn else None))
    return out
