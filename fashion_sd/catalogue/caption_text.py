"""Caption grammar: filling the template from a row's values, possessives, a/an, tidy spacing."""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

from fashion_sd.catalogue import article_types
from fashion_sd.catalogue.styles import normalise_year
from fashion_sd.caption_template import (
    DERIVED_FIELDS,
    MISSING_TOKENS,
    PAPER_TEMPLATE,
    STYLE_COLUMNS,
    CaptionError,
    template_errors,
    template_fields,
)


def possessive(gender: str) -> str:
    """Men -> Men's, Women -> Women's, Boys -> Boys', Girls -> Girls'; Unisex stays Unisex."""
    if gender == "Unisex":
        return gender
    return f"{gender}'" if gender.endswith("s") else f"{gender}'s"


_ARTICLE = re.compile(r"\b(a|an|A|An)(\s+)([\w'-]+)")
# Words that start with a vowel letter but a consonant sound, and the reverse.
_CONSONANT_SOUND = ("uni", "use", "usu", "uti", "eu", "one", "once", "ufo")
_VOWEL_SOUND = ("hour", "honest", "honour", "heir")


def _an(word: str) -> bool:
    w = word.lower()
    if w[0].isdigit():
        return w.startswith(("8", "11", "18"))  # an 8, an 11, an 18; a 2011
    if w.startswith(_VOWEL_SOUND):
        return True
    return w[0] in "aeiou" and not w.startswith(_CONSONANT_SOUND)


def fix_articles(text: str) -> str:
    """Choose "a" or "an" by the next word, so "a Ethnic" (year missing) becomes "an Ethnic"."""
    def repl(m: re.Match) -> str:
        art = "an" if _an(m.group(3)) else "a"
        return (art.capitalize() if m.group(1)[0] == "A" else art) + m.group(2) + m.group(3)

    return _ARTICLE.sub(repl, text)


def tidy(text: str) -> str:
    """Collapse the gaps a missing field leaves, and spaces or commas it strands."""
    text = " ".join(text.split())
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?=[,;:.!?]|$)", "", text)
    return text.strip(" ,;:")


def render_captions(df: pd.DataFrame, template: str) -> pd.Series:
    """One caption per row of ``df`` (source columns) through ``template``; missing parts left out."""
    names = template_fields(template)
    values: dict[str, Any] = {}
    for name in set(names):
        col = DERIVED_FIELDS.get(name, name)
        series = df[col]
        if name == "gender":
            series = series.map(possessive, na_action="ignore")
        elif name == "article":
            # One lookup per distinct type, so an unknown type warns once, not once per row.
            table = {t: article_types.singular(t) for t in series.dropna().unique()}
            series = series.map(table)
        values[name] = series.where(series.notna(), "").tolist()
    rows = [dict(zip(values, vals)) for vals in zip(*values.values())] if values else [{}] * len(df)
    return pd.Series([fix_articles(tidy(template.format(**r))) for r in rows], index=df.index,
                     dtype=object)


def caption_from_attributes(template: str = PAPER_TEMPLATE, **attributes: str | None) -> str:
    """A caption from garment attributes, through the same rules as the training captions.

    Keys are template fields or source columns: ``year, usage, season, colour, gender, article``
    (``article`` as the catalogue spells it, e.g. ``Sweaters``). Missing ones are left out.

    >>> caption_from_attributes(year="2011", usage="Casual", season="Fall", colour="White",
    ...                         gender="Men", article="Sweaters")
    "an image of a 2011 Casual Fall White Men's Sweater"
    """
    if errs := template_errors(template):
        raise CaptionError("; ".join(errs))
    row = {col: None for col in STYLE_COLUMNS}
    for key, value in attributes.items():
        col = DERIVED_FIELDS.get(key, key)
        if col not in row:
            raise CaptionError(f"unknown attribute {key!r}; use {', '.join(DERIVED_FIELDS)}")
        row[col] = None if value is None or str(value).strip() in MISSING_TOKENS else str(value).strip()
    if row["year"] is not None:
        row["year"] = normalise_year(row["year"])
    if not row["articleType"]:
        raise CaptionError("an article type is needed to name the garment (e.g. --article Tshirts)")
    return render_captions(pd.DataFrame([row]), template).iloc[0]
