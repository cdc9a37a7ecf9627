"""Stable Diffusion 1.x's LoRA-able layers and their kernel shapes, without building a model.

So a LoRA file can be checked against the model from its safetensors header in milliseconds,
before the 860M-parameter U-Net is built. Names follow :mod:`fashion_sd.lora`:
``st{i:02d}.attn{1,2}.{to_q,to_k,to_v,out_proj}`` for the i-th SpatialTransformer of KerasCV's
``DiffusionModel`` (in its layer order) and ``te{i:02d}.{proj}`` for the CLIP text encoder.
``tests/test_unet_slow.py`` checks this table against the real model.
"""

from __future__ import annotations

from functools import cache

# Channels of the 16 SpatialTransformers in layer order: down 320 320 640 640 1280 1280,
# middle 1280, up 1280 x3, 640 x3, 320 x3.
TRANSFORMER_CHANNELS = (320, 320, 640, 640, 1280, 1280, 1280,
                        1280, 1280, 1280, 640, 640, 640, 320, 320, 320)
CONTEXT_DIM = 768  # CLIP ViT-L/14's hidden size: what cross-attention keys and values read
TEXT_LAYERS, TEXT_WIDTH, TEXT_MLP = 12, 768, 3072


@cache
def expected_kernel_shapes() -> dict[str, tuple[int, int]]:
    """``{layer name: (fan_in, fan_out)}`` of every Dense a LoRA may change in SD 1.x."""
    out: dict[str, tuple[int, int]] = {}
    for i, c in enumerate(TRANSFORMER_CHANNELS):
        for attn in ("attn1", "attn2"):
            kv_in = c if attn == "attn1" else CONTEXT_DIM
            out[f"st{i:02d}.{attn}.to_q"] = (c, c)
            out[f"st{i:02d}.{attn}.to_k"] = (kv_in, c)
            out[f"st{i:02d}.{attn}.to_v"] = (kv_in, c)
            out[f"st{i:02d}.{attn}.out_proj"] = (c, c)
    for i in range(TEXT_LAYERS):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"te{i:02d}.{proj}"] = (TEXT_WIDTH, TEXT_WIDTH)
        out[f"te{i:02d}.fc1"] = (TEXT_WIDTH, TEXT_MLP)
        out[f"te{i:02d}.fc2"] = (TEXT_MLP, TEXT_WIDTH)
    return out
