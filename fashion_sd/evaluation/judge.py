"""The per-image judgements behind the evaluation tables: colour and framing (weight-free, always)
and, when a CLIP model is there, CLIP score, garment type and on-model.

One :class:`Judge` serves the checkpoint evaluation and ``evaluate_fid.py --images``; text
embeddings are computed once per text and reused across models.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fashion_sd.evaluation import adherence, garment

# Summary columns of a judged set, in table order (the checkpoint tables carry them too).
SUMMARY = ["clip_score", "type_top1", "type_top3", "colour_top1", "gender_top1", "on_model_rate",
           "colour_accuracy", "colour_judged_share", "cut_off_rate", "cut_off_judged_share",
           "cut_off_low", "cut_off_high"]


# Zero-shot gender: what counts as right for each prompt's gender. A "Unisex" garment is made for
# men and women alike, so a photo judged Men's, Women's or Unisex is right; the others need
# their own gender.
GENDER_ACCEPTS = {"Unisex": ("Men", "Women", "Unisex")}


def accepted_genders(label: str) -> list[str]:
    """The zero-shot genders right for ``label`` (:data:`GENDER_ACCEPTS`, else itself)."""
    return list(GENDER_ACCEPTS.get(label, (label,)))


def accepted_colours(label: str, colours: list[str]) -> list[str]:
    """The zero-shot colour names right for ``label``: the label and its named neighbours, as the
    garment colour metric counts them (Grey Melange / Grey, Burgundy / Maroon, Skin / Nude are
    within Delta E 10), among the classes the judge chooses from."""
    near = garment.colour_neighbours(label) if label in garment.PALETTE else [label]
    return [c for c in colours if c in near]


def chance(accepted: list[list[str]], classes: list[str]) -> float:
    """What a judge that picks a class at random scores on these labels: the mean share of
    the classes that would count as right."""
    return float(np.mean([len(a) / len(classes) for a in accepted])) if accepted and classes else math.nan


def _known(values, vocabulary) -> list:
    return [v if v in vocabulary else None for v in values]


def _scored(values, known) -> pd.arrays.BooleanArray:
    """Per-image booleans, NA where the prompt's value is unknown (not scored)."""
    return pd.array(np.where([k is not None for k in known], values, None), dtype="boolean")


class Judge:
    """``clip``: a :class:`fashion_sd.evaluation.clip.ClipModel` or None (weight-free metrics only);
    ``vocabulary``: the singular garment types the zero-shot classifier chooses from;
    ``colours``: the colour names it chooses from (the run's own); genders are the catalogue's."""

    def __init__(self, clip=None, vocabulary=(), colours=()):
        self.clip = clip
        self.vocabulary = sorted(set(vocabulary))
        self.colours = sorted(set(colours))
        self._texts: dict[str, np.ndarray] = {}

    def texts(self, texts: list[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self._texts]
        if new:
            self._texts.update(zip(new, self.clip.embed_texts(new)))
        return np.stack([self._texts[t] for t in texts])

    def _zero_shot(self, img, classes: list[str], texts: list[str], labels: list, k: int = 1):
        """(the most similar class per image, whether each label is in the top ``k``)."""
        sims = adherence.similarity(img, self.texts(texts))
        index = [classes.index(label) if label is not None else 0 for label in labels]
        return ([classes[i] for i in np.argmax(sims, axis=1)],
                _scored(adherence.top_k_correct(sims, index, k), labels), sims, index)

    def __call__(self, images, prompts, types, colours, genders=None) -> pd.DataFrame:
        """One row per image. ``types``/``colours``/``genders``: the prompt's garment type
        (singular), colour name and gender, None where unknown."""
        table = garment.score_images(list(images), colours).drop(columns="image")
        if self.clip is None:
            return table
        img = self.clip.embed_images(images)
        table["clip_score"] = adherence.clip_scores(img, self.texts(list(prompts)))
        if self.vocabulary:
            types = _known(types, self.vocabulary)
            table["type"] = types
            judged, top1, sims, index = self._zero_shot(
                img, self.vocabulary, adherence.type_texts(self.vocabulary), types)
            table["type_judged"], table["type_top1"] = judged, top1
            table["type_top3"] = _scored(adherence.top_k_correct(sims, index, 3), types)
            known = [t or self.vocabulary[0] for t in types]
            worn = adherence.on_model(img, self.texts([adherence.PRODUCT_TEXT.format(t) for t in known]),
                                      self.texts([adherence.WORN_TEXT.format(t) for t in known]))
            table["on_model"] = _scored(worn, types)
        if self.colours:
            labels = _known(colours, self.colours)
            table["colour_clip"], table["colour_top1"] = self._picked(
                img, self.colours, adherence.colour_texts(self.colours),
                [None if c is None else accepted_colours(c, self.colours) for c in labels])
        if genders is not None:
            genders = _known(genders, adherence.GENDERS)
            table["gender"] = genders
            table["gender_judged"], table["gender_top1"] = self._picked(
                img, list(adherence.GENDERS), adherence.gender_texts(list(adherence.GENDERS)),
                [None if g is None else accepted_genders(g) for g in genders])
        return table

    def _picked(self, img, classes: list[str], texts: list[str], accepted: list):
        """(the most similar class per image, whether it is one of the image's ``accepted``
        classes; NA where the prompt's value is unknown)."""
        sims = adherence.similarity(img, self.texts(texts))
        judged = [classes[i] for i in np.argmax(sims, axis=1)]
        right = [j in a if a is not None else False for j, a in zip(judged, accepted)]
        return judged, _scored(right, accepted)

    def chances(self, colours, genders) -> dict:
        """Each zero-shot column's chance level on these prompts' labels (NaN when unmeasured)."""
        known_c = [c for c in _known(colours, self.colours) if c is not None]
        known_g = [g for g in _known(genders or [], adherence.GENDERS) if g is not None]
        return {"type_chance": 1 / len(self.vocabulary) if self.vocabulary else math.nan,
                "colour_chance": chance([accepted_colours(c, self.colours) for c in known_c],
                                        self.colours),
                "gender_chance": chance([accepted_genders(g) for g in known_g],
                                        list(adherence.GENDERS))}


def _mean(table: pd.DataFrame, column: str) -> float:
    if column not in table:
        return math.nan
    values = table[column].dropna().astype(float)
    return float(values.mean()) if len(values) else math.nan


def summarise(table: pd.DataFrame) -> dict:
    """The :data:`SUMMARY` columns of a judged set (NaN where not measured) and the counts. The
    set's CLIP score clamps the mean, as torchmetrics does (:func:`adherence.set_clip_score`)."""
    base = garment.summarise(table)
    clip = (adherence.set_clip_score(table["clip_score"].dropna())
            if "clip_score" in table else math.nan)
    return {"clip_score": clip, "type_top1": _mean(table, "type_top1"),
            "type_top3": _mean(table, "type_top3"), "colour_top1": _mean(table, "colour_top1"),
            "gender_top1": _mean(table, "gender_top1"), "on_model_rate": _mean(table, "on_model"),
            **base}


def load_judge(cfg, vocabulary, colours=()) -> tuple[Judge, str]:
    """The judge ``cfg.eval.clip`` asks for, and why CLIP is off when it is (empty when on)."""
    from fashion_sd.evaluation.clip import load_clip  # noqa: PLC0415 - imports TensorFlow

    clip, why = load_clip(cfg.eval.clip, cfg.eval.clip_preset, cfg.seed)
    if why:
        print(f"CLIP metrics off: {why}")
    return Judge(clip, vocabulary, colours), why
