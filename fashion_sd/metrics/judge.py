"""The per-image judgements behind the evaluation tables: colour and framing (weight-free, always)
and, when a CLIP model is there, CLIP score, garment type and on-model.

One :class:`Judge` serves the checkpoint evaluation and ``evaluate_fid.py --images``; text
embeddings are computed once per text and reused across models.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fashion_sd.metrics import adherence, garment

# Summary columns of a judged set, in table order (the checkpoint tables carry them too).
SUMMARY = ["clip_score", "type_top1", "type_top3", "on_model_rate", "colour_accuracy",
           "cut_off_rate"]


class Judge:
    """``clip``: a :class:`fashion_sd.metrics.clip.ClipModel` or None (weight-free metrics only);
    ``vocabulary``: the singular garment types the zero-shot classifier chooses from."""

    def __init__(self, clip=None, vocabulary=()):
        self.clip = clip
        self.vocabulary = sorted(set(vocabulary))
        self._texts: dict[str, np.ndarray] = {}

    def texts(self, texts: list[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self._texts]
        if new:
            self._texts.update(zip(new, self.clip.embed_texts(new)))
        return np.stack([self._texts[t] for t in texts])

    def __call__(self, images, prompts, types, colours) -> pd.DataFrame:
        """One row per image. ``types``/``colours``: the prompt's garment type (singular) and
        colour name, None where unknown."""
        table = garment.score_images(list(images), colours).drop(columns="image")
        if self.clip is None:
            return table
        types = [t if t in self.vocabulary else None for t in types]
        known = [t or self.vocabulary[0] for t in types] if self.vocabulary else []
        img = self.clip.embed_images(images)
        table["clip_score"] = adherence.clip_score(img, self.texts(list(prompts)))
        if self.vocabulary:
            sims = adherence.similarity(img, self.texts(adherence.type_texts(self.vocabulary)))
            labels = [self.vocabulary.index(t) for t in known]
            worn = adherence.on_model(img, self.texts([adherence.PRODUCT_TEXT.format(t) for t in known]),
                                      self.texts([adherence.WORN_TEXT.format(t) for t in known]))
            ok = [t is not None for t in types]

            def scored(values):  # an image whose prompt type is unknown is not scored
                return pd.array(np.where(ok, values, None), dtype="boolean")

            table["type"] = types
            table["type_judged"] = [self.vocabulary[i] for i in np.argmax(sims, axis=1)]
            table["type_top1"] = scored(adherence.top_k_correct(sims, labels, 1))
            table["type_top3"] = scored(adherence.top_k_correct(sims, labels, 3))
            table["on_model"] = scored(worn)
        return table


def _mean(column) -> float:
    values = column.dropna().astype(float)
    return float(values.mean()) if len(values) else math.nan


def summarise(table: pd.DataFrame) -> dict:
    """The :data:`SUMMARY` columns of a judged set (NaN where not measured) and the counts."""
    base = garment.summarise(table)
    return {"clip_score": _mean(table["clip_score"]) if "clip_score" in table else math.nan,
            "type_top1": _mean(table["type_top1"]) if "type_top1" in table else math.nan,
            "type_top3": _mean(table["type_top3"]) if "type_top3" in table else math.nan,
            "on_model_rate": _mean(table["on_model"]) if "on_model" in table else math.nan,
            "colour_accuracy": base["colour_accuracy"], "cut_off_rate": base["cut_off_rate"],
            "colour_scored": base["colour_scored"], "images": base["images"]}


def load_judge(cfg, vocabulary) -> tuple[Judge, str]:
    """The judge ``cfg.eval.clip`` asks for, and why CLIP is off when it is (empty when on)."""
    from fashion_sd.metrics.clip import load_clip  # noqa: PLC0415 - imports TensorFlow

    clip, why = load_clip(cfg.eval.clip, cfg.eval.clip_preset, cfg.seed)
    if why:
        print(f"CLIP metrics off: {why}")
    return Judge(clip, vocabulary), why
