"""Tensor names: the CompVis single-file layout <-> diffusers' names, for the SD 1.x parts.

diffusers' names (``UNet2DConditionModel``, ``AutoencoderKL``, transformers' ``CLIPTextModel``) are
this package's common language: a CompVis file is renamed into them first, then mapped onto KerasCV
(:mod:`fashion_sd.interop.kerascv`). Both directions come from one table of block prefixes, so
they cannot drift apart; the inverse is what the tests hand to diffusers' own single-file loader.
"""

from __future__ import annotations

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
EMA_PREFIX = "model_ema."

# CompVis training-state buffers that are not weights of any inference component.
SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "model_ema.decay",
    "model_ema.num_updates"})

_RES_UNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_RES_VAE = {"nin_shortcut": "conv_shortcut"}
_ATTN_VAE = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers before 0.14 named the VAE attention's parts differently; folders saved then still exist.
OLD_DIFFUSERS_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _unet_blocks() -> list[tuple[str, str, dict]]:
    t = [("time_embed.0", "time_embedding.linear_1", {}), ("time_embed.2", "time_embedding.linear_2", {}),
         ("input_blocks.0.0", "conv_in", {})]
    for n in range(1, 12):
        b, j = divmod(n - 1, 3)
        if j < 2:
            t.append((f"input_blocks.{n}.0", f"down_blocks.{b}.resnets.{j}", _RES_UNET))
            if b < 3:
                t.append((f"input_blocks.{n}.1", f"down_blocks.{b}.attentions.{j}", {}))
        else:
            t.append((f"input_blocks.{n}.0.op", f"down_blocks.{b}.downsamplers.0.conv", {}))
    t += [("middle_block.0", "mid_block.resnets.0", _RES_UNET),
          ("middle_block.1", "mid_block.attentions.0", {}),
          ("middle_block.2", "mid_block.resnets.1", _RES_UNET)]
    for n in range(12):
        b, j = divmod(n, 3)
        t.append((f"output_blocks.{n}.0", f"up_blocks.{b}.resnets.{j}", _RES_UNET))
        if b > 0:
            t.append((f"output_blocks.{n}.1", f"up_blocks.{b}.attentions.{j}", {}))
        if j == 2 and b < 3:
            t.append((f"output_blocks.{n}.{1 if b == 0 else 2}.conv",
                      f"up_blocks.{b}.upsamplers.0.conv", {}))
    t += [("out.0", "conv_norm_out", {}), ("out.2", "conv_out", {})]
    return t


def _vae_blocks() -> list[tuple[str, str, dict]]:
    t = [("quant_conv", "quant_conv", {}), ("post_quant_conv", "post_quant_conv", {})]
    for part in ("encoder", "decoder"):
        t += [(f"{part}.conv_in", f"{part}.conv_in", {}), (f"{part}.conv_out", f"{part}.conv_out", {}),
              (f"{part}.norm_out", f"{part}.conv_norm_out", {}),
              (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _RES_VAE),
              (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _ATTN_VAE),
              (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _RES_VAE)]
    for i in range(4):
        for j in range(2):
            t.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _RES_VAE))
        if i < 3:
            t.append((f"encoder.down.{i}.downsample.conv",
                      f"encoder.down_blocks.{i}.downsamplers.0.conv", {}))
        for j in range(3):  # CompVis counts the decoder's levels from the bottom
            t.append((f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{3 - i}.resnets.{j}", _RES_VAE))
        if i > 0:
            t.append((f"decoder.up.{i}.upsample.conv",
                      f"decoder.up_blocks.{3 - i}.upsamplers.0.conv", {}))
    return t


UNET_BLOCKS = _unet_blocks()
VAE_BLOCKS = _vae_blocks()


def _rename(key: str, blocks, forward: bool) -> str | None:
    """``key`` under the other naming, or None when no block prefix claims it."""
    best = None
    for cv, df, inner in blocks:
        src, dst = (cv, df) if forward else (df, cv)
        if key.startswith(src + ".") and (best is None or len(src) > len(best[0])):
            best = (src, dst, inner)
    if best is None:
        return None
    src, dst, inner = best
    rest = key[len(src) + 1:]
    table = inner if forward else {v: k for k, v in inner.items()}
    for a in sorted(table, key=len, reverse=True):
        if rest.startswith(a + "."):
            rest = table[a] + rest[len(a):]
            break
    return f"{dst}.{rest}"


def compvis_unet_key(key: str) -> str | None:
    """``input_blocks.1.0.in_layers.0.weight`` -> ``down_blocks.0.resnets.0.norm1.weight``."""
    return _rename(key, UNET_BLOCKS, True)


def compvis_vae_key(key: str) -> str | None:
    return _rename(key, VAE_BLOCKS, True)


def compvis_clip_key(key: str) -> str:
    """After ``cond_stage_model.transformer.``; older files lack the ``text_model.`` level."""
    return key if key.startswith("text_model.") else "text_model." + key


def ema_key(unet_key: str) -> str:
    """CompVis' LitEma stores ``model.diffusion_model.a.b`` as ``model_ema.diffusion_modelab``."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def diffusers_vae_key(key: str) -> str:
    """A diffusers VAE key in today's names (older folders say query/key/value/proj_attn)."""
    head, sep, tail = key.partition(".mid_block.attentions.0.")
    if sep:
        for old, new in OLD_DIFFUSERS_VAE_ATTN.items():
            if tail.startswith(old + "."):
                return head + sep + new + tail[len(old):]
    return key


def to_compvis(unet: dict | None = None, vae: dict | None = None,
               text_encoder: dict | None = None) -> dict:
    """diffusers state dicts (numpy or torch) -> one CompVis-layout state dict (a single file)."""
    out = {}
    for sd, blocks, prefix in ((unet, UNET_BLOCKS, UNET_PREFIX), (vae, VAE_BLOCKS, VAE_PREFIX)):
        for k, v in (sd or {}).items():
            name = _rename(k, blocks, False)
            if name is None:
                raise KeyError(f"{k}: no CompVis name for this diffusers tensor")
            if ".mid.attn_1." in name and name.endswith("weight") and len(v.shape) == 2:
                v = v.reshape(tuple(v.shape) + (1, 1))  # CompVis' VAE attention uses 1x1 convs
            out[prefix + name] = v
    for k, v in (text_encoder or {}).items():
        out[CLIP_PREFIX + k] = v
    return out


def unet_block_names() -> dict[str, list[str]]:
    """diffusers' names of the U-Net's blocks of each kind, in the data-flow order."""
    res = [f"down_blocks.{b}.resnets.{j}" for b in range(4) for j in range(2)]
    res += ["mid_block.resnets.0", "mid_block.resnets.1"]
    res += [f"up_blocks.{b}.resnets.{j}" for b in range(4) for j in range(3)]
    st = [f"down_blocks.{b}.attentions.{j}" for b in range(3) for j in range(2)]
    st += ["mid_block.attentions.0"]
    st += [f"up_blocks.{b}.attentions.{j}" for b in (1, 2, 3) for j in range(3)]
    conv = ["conv_in"] + [f"down_blocks.{b}.downsamplers.0.conv" for b in range(3)] + ["conv_out"]
    ups = [f"up_blocks.{b}.upsamplers.0.conv" for b in range(3)]
    return {"res": res, "st": st, "conv": conv, "ups": ups}
