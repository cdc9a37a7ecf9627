"""Prompt adherence from CLIP embeddings: pure numpy, no model.

- **CLIP score** (Hessel et al. 2021, "CLIPScore", https://arxiv.org/abs/2104.08718) as
  torchmetrics computes it, the definition most text-to-image papers report: each image's
  ``100 cos(image, prompt)`` (:func:`clip_scores`, unclamped in the per-image tables) and a set's
  ``max(100 mean(cos), 0)`` (:func:`set_clip_score`): the mean is clamped, not each image (the
  paper's ``w max(cos, 0)`` per image, with w = 2.5, would read higher wherever some cosines are
  negative). tests/evaluation/test_clip_reference.py checks both against torchmetrics' ``clip_score``.
- **Garment type**: zero-shot classification of each image over the run's own article types
  (one text per type, :func:`type_texts`); correct at k when the prompt's type is among the k
  most similar. Ties count against the image (a type is in the top k only when fewer than k
  types are strictly more similar), so a constant embedding never scores.
- **Colour and gender**: the same zero-shot top-1 over the run's own colour names ("a photo of
  a {colour} garment") and the catalogue's five genders ("a photo of {Men's} clothing"), so a
  designer sees which attribute of the prompt a checkpoint gets wrong.
- **On-model rate**: the share of images closer to "a person wearing a {type}" than to a
  product shot of it, the paper's "accompanying models" complaint as a number.

Embeddings come from :mod:`fashion_sd.evaluation.clip`; tests inject their own.
"""

from __future__ import annotations

import numpy as np

from fashion_sd.catalogue.caption_text import possessive

TYPE_TEXT = "a photo of a {}"
PRODUCT_TEXT = "a product photo of a {} on a plain background"
WORN_TEXT = "a photo of a person wearing a {}"
COLOUR_TEXT = "a photo of a {} garment"
GENDER_TEXT = "a photo of {} clothing"
GENDERS = ("Men", "Women", "Boys", "Girls", "Unisex")  # the catalogue's (docs/dataset.md)


def normalise(x) -> np.ndarray:
    """Rows scaled to unit length (float64); a zero row stays zero rather than NaN."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def clip_scores(image_emb, text_emb) -> np.ndarray:
    """``100 cos`` for each (image, its prompt) pair: rows of two (n, d) arrays; unclamped."""
    return 100.0 * (normalise(image_emb) * normalise(text_emb)).sum(axis=-1)


def set_clip_score(scores) -> float:
    """A set's CLIP score from its images' :func:`clip_scores`: ``max(mean, 0)`` (torchmetrics);
    NaN for an empty set."""
    scores = np.asarray(scores, dtype=np.float64)
    return float(max(scores.mean(), 0.0)) if scores.size else float("nan")


def similarity(image_emb, class_emb) -> np.ndarray:
    """Cosine similarity (n images, k classes)."""
    return normalise(image_emb) @ normalise(class_emb).T


def top_k_correct(sims, labels, k: int) -> np.ndarray:
    """Whether each image's label (a class index) is among its ``k`` most similar classes."""
    sims = np.asarray(sims, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    own = sims[np.arange(len(labels)), labels]
    rank = (sims > own[:, None]).sum(axis=1) + (sims == own[:, None]).sum(axis=1) - 1
    return rank < k


def type_texts(types: list[str]) -> list[str]:
    return [TYPE_TEXT.format(t) for t in types]


def colour_texts(colours: list[str]) -> list[str]:
    return [COLOUR_TEXT.format(c.lower()) for c in colours]


def gender_texts(genders: list[str]) -> list[str]:

    return [GENDER_TEXT.format(possessive(g)) for g in genders]


def on_model(image_emb, product_emb, worn_emb) -> np.ndarray:
    """Whether each image is closer to its "person wearing" text than to its product-shot one."""
    img = normalise(image_emb)
    return (img * normalise(worn_emb)).sum(-1) > (img * normalise(product_emb)).sum(-1)

