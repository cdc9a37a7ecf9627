"""Prompt adherence from CLIP embeddings: pure numpy, no model.

- **CLIP score** (Hessel et al. 2021, "CLIPScore", https://arxiv.org/abs/2104.08718), reported
  as torchmetrics reports it: ``100 * max(cos(image, prompt), 0)`` per image.
- **Garment type**: zero-shot classification of each image over the run's own article types
  (one text per type, :func:`type_texts`); correct at k when the prompt's type is among the k
  most similar. Ties count against the image (a type is in the top k only when fewer than k
  types are strictly more similar), so a constant embedding never scores.
- **On-model rate**: the share of images closer to "a person wearing a {type}" than to a
  product shot of it, the paper's "accompanying models" complaint as a number.

Embeddings come from :mod:`fashion_sd.metrics.clip`; tests inject their own.
"""

from __future__ import annotations

import numpy as np

TYPE_TEXT = "a photo of a {}"
PRODUCT_TEXT = "a product photo of a {} on a plain background"
WORN_TEXT = "a photo of a person wearing a {}"


def normalise(x) -> np.ndarray:
    """Rows scaled to unit length (float64); a zero row stays zero rather than NaN."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def clip_score(image_emb, text_emb) -> np.ndarray:
    """``100 * max(cos, 0)`` for each (image, its prompt) pair: rows of two (n, d) arrays."""
    cos = (normalise(image_emb) * normalise(text_emb)).sum(axis=-1)
    return 100.0 * np.maximum(cos, 0.0)


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


def on_model(image_emb, product_emb, worn_emb) -> np.ndarray:
    """Whether each image is closer to its "person wearing" text than to its product-shot one."""
    img = normalise(image_emb)
    return (img * normalise(worn_emb)).sum(-1) > (img * normalise(product_emb)).sum(-1)

