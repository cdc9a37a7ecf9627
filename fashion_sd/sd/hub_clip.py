"""keras-hub's CLIP (``keras_hub.models.CLIPBackbone``) set up to compute what transformers'
``CLIPModel`` computes: the evaluation's CLIP judge (:mod:`fashion_sd.evaluation.clip`) and what
the interop converts a transformers CLIP into (:mod:`fashion_sd.interop.clip`). It lives here,
below both, so that neither stage imports the other.

What keras-hub 0.32's CLIP computes, against transformers':

- the same: the text encoder's causal mask (``MultiHeadAttention(use_causal_mask=True)``), the
  blocks' and the vision LayerNorms' epsilon 1e-5, QuickGELU (or exact GELU when the config says
  ``gelu``), the vision feature (class token after the post-LayerNorm, projected without bias),
  the text projection, and ``exp(logit_scale) cos`` normalised row by row in ``CLIPHead``;
- the text encoder's final LayerNorm is built with epsilon 1e-6 where CLIP has 1e-5, and no
  argument sets it; :func:`build` and :func:`load` set it on the instance (the one value not
  reached by configuration: a keras-hub preset rebuilds the layer with 1e-6 on every load);
- a fresh ``CLIPVisionEmbedding`` initialises its ``position_ids`` weight to zeros (every patch
  would read position 0); its presets hold 0..n-1, which :func:`build` assigns;
- the text is pooled at ``argmax(token_ids)``: transformers pools at the first end token
  (49407, the largest id), and so does argmax when the end token is unique. Our tokenizer pads
  with the end token, as KerasCV's Stable Diffusion does, which would make argmax a tie, so
  :func:`openai_padding` pads after the first end token with 0 as OpenAI's tokenizer does; the
  causal mask keeps the padding from reaching that token either way.

Everything is float32, whatever the global dtype policy: the judge is compared with
transformers' float32 and a mixed-precision run must not change its scores.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from fashion_sd.clip_spec import ClipUnavailable
from fashion_sd.sd.tokenizer import END_TOKEN

TEXT_EPSILON = 1e-5  # transformers' CLIPTextConfig.layer_norm_eps and OpenAI's LayerNorm


def keras_hub():
    """The keras-hub module, or :class:`ClipUnavailable` saying how to install it."""
    try:
        import keras_hub as hub  # noqa: PLC0415 - only the CLIP judge needs it
    except ImportError as exc:
        raise ClipUnavailable(f"the CLIP judge needs keras-hub ({exc}): pip install --no-deps "
                              "keras-hub==0.32.0, and its runtime needs from requirements.txt "
                              "(sentencepiece, regex, tokenizers)") from None
    return hub


def _as_transformers(backbone):
    """The final text LayerNorm's epsilon (see the module docstring); returns ``backbone``."""
    backbone.text_encoder.layer_norm.epsilon = TEXT_EPSILON
    return backbone


def build(arguments: dict):
    """A randomly initialised ``CLIPBackbone`` from ``{"projection_dim", "vision", "text"}``: the
    keyword arguments of ``CLIPBackbone``, ``CLIPVisionEncoder`` and ``CLIPTextEncoder``."""
    hub = keras_hub()
    vision = hub.models.CLIPVisionEncoder(**arguments["vision"], data_format="channels_last",
                                          dtype="float32")
    text = hub.models.CLIPTextEncoder(**arguments["text"], dtype="float32")
    backbone = hub.models.CLIPBackbone(vision, text, arguments["projection_dim"], dtype="float32")
    ids = backbone.vision_encoder.embedding.position_ids
    ids.assign(np.arange(ids.shape[1]).reshape(ids.shape))
    return _as_transformers(backbone)


def load(preset: str | Path):
    """``CLIPBackbone.from_preset(preset)`` in float32 (a keras-hub preset folder or name)."""
    return _as_transformers(keras_hub().models.CLIPBackbone.from_preset(str(preset),
                                                                         dtype="float32"))


def save(backbone, folder: str | Path) -> Path:
    """Write ``backbone`` as a keras-hub preset folder that :func:`load` (and
    ``eval.clip: local:DIR``) reads back."""
    backbone.save_to_preset(str(folder))
    return Path(folder)


def openai_padding(ids: np.ndarray) -> np.ndarray:
    """Token ids with everything after the first end token set to 0, OpenAI's padding: the end
    token is then the unique largest id, where keras-hub's ``argmax`` pooling finds it."""
    after = np.cumsum(ids == END_TOKEN, axis=1) - (ids == END_TOKEN) > 0
    return np.where(after, 0, ids).astype("int32")


def resolution(backbone) -> int:
    return int(backbone.vision_encoder.image_shape[0])


def logit_scale(backbone) -> float:
    """``exp(logit_scale)``, CLIP's temperature as transformers applies it (unclamped)."""
    return float(np.exp(keras.ops.convert_to_numpy(backbone.clip_head.logit_scale)))
