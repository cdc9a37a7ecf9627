"""KerasCV's CLIP network, repaired on each instance to compute what OpenAI's CLIP (and
transformers' ``CLIPModel``) computes: the model under evaluation's CLIP judge
(:mod:`fashion_sd.evaluation.clip`) and what the interop converts transformers' CLIP into
(:mod:`fashion_sd.interop.clip`). keras-cv 0.9 is frozen, so the repairs live here.

Why KerasCV's CLIP is repaired on each instance (:func:`repair`; keras-cv 0.9 is frozen):

- its text encoder's "causal mask" is ``triu(ones)`` *added* to the attention logits: +1 on and
  above the diagonal, nothing masked, so every token attends to the tokens after it. OpenAI's
  CLIP masks them (-inf above the diagonal); with OpenAI's weights KerasCV's text features are
  not OpenAI's. :func:`_causal_text_call` replaces the text encoder's ``call`` with the masked one;
- its final text LayerNorm uses Keras' default epsilon 1e-3 where CLIP has 1e-5;
- it pools the text at ``argmax(ids)``, which is the end token only when the padding is smaller
  than it (OpenAI pads with 0); we pad with the end token as KerasCV's Stable Diffusion does, so
  we pool explicitly at the *first* end token, as transformers does;
- its ``CLIPHead`` normalises by the norm of the whole batch, not of each row, so logits are
  computed here (:meth:`ClipModel.logits`) as ``exp(logit_scale) cos``.

Only ``call`` and one epsilon change: variables and weight files stay KerasCV's.
"""

from __future__ import annotations

import types
from pathlib import Path

from keras import ops
from keras_cv.src.models.feature_extractor.clip import clip_model
from keras_cv.src.utils.preset_utils import save_to_preset

from fashion_sd.sd.tokenizer import END_TOKEN


def clip_class():

    # KerasCV's CLIP refuses to build without keras-nlp, which only its tokenizer
    # (CLIPProcessor) uses. We tokenize with our own copy of the same BPE, so the check is
    # lifted rather than pulling keras-nlp (and keras-hub, tensorflow-text) into the install.
    if clip_model.keras_nlp is None:
        clip_model.keras_nlp = True
    return clip_model.CLIP


def _causal_text_call(self, inputs, attention_mask=None):
    """KerasCV's ``CLIPTextEncoder.call`` with a causal mask that masks, pooled at the first end
    token (see the module docstring)."""

    n = self.context_length
    positions = ops.arange(n, dtype="int32")
    x = self.token_embedding(inputs) + self.positional_embedding(positions[None])
    # -1e9 above the diagonal: a token never sees the ones after it (OpenAI: -inf, fill_(-inf)).
    mask = ops.where(positions[None, :] > positions[:, None], -1e9, 0.0)
    padding = 0.0
    if attention_mask is not None:  # KerasCV's own padding term, kept for its callers
        padding = (1.0 - ops.cast(attention_mask, "float32"))[:, None, None, :] * -1e8
    x = self.ln_final(self.encoder(x, causal_attention_mask=mask, attention_mask=padding))
    ids = ops.cast(inputs, "int32")
    first_end = ops.min(ops.where(ids == END_TOKEN, positions[None], n - 1), axis=-1)
    pooled = ops.take_along_axis(x, ops.cast(first_end, "int32")[:, None, None], axis=1)[:, 0]
    return self.text_projector(pooled)


def repair(model):
    """Make KerasCV's ``CLIP`` compute OpenAI's CLIP, on this instance (see the module docstring);
    returns ``model``."""

    text = model.text_encoder
    text.call = types.MethodType(_causal_text_call, text)
    text.ln_final.epsilon = 1e-5
    return model


def save_clip(model, folder: str | Path) -> Path:
    """Write ``model`` as a KerasCV preset folder that ``eval.clip: local:DIR`` loads."""

    save_to_preset(model, str(folder))
    return Path(folder)
