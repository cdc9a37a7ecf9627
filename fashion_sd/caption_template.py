"""The caption template's vocabulary and its check: the catalogue's columns, the fields a template
may name, the paper's template.

Below both :mod:`fashion_sd.config` (which validates ``captions.template``) and
:mod:`fashion_sd.catalogue.captions` (which fills it), so neither imports the other for it. Pure Python.
"""

from __future__ import annotations

import string

from fashion_sd.errors import FashionSDError

STYLE_COLUMNS = ("id", "gender", "masterCategory", "subCategory", "articleType", "baseColour",
                 "season", "year", "usage", "productDisplayName")
# Template fields derived from the source columns; source columns may be named directly as well.
DERIVED_FIELDS = {"year": "year", "usage": "usage", "season": "season", "colour": "baseColour",
                  "gender": "gender", "article": "articleType"}
CATEGORY_COLUMNS = ("masterCategory", "subCategory", "articleType")
PAPER_TEMPLATE = "an image of a {year} {usage} {season} {colour} {gender} {article}"
# productDisplayName is free text the captions never use; every other column is needed.
REQUIRED_COLUMNS = STYLE_COLUMNS[:-1]
# Values that mean "unknown" in the wild; `NA` is how the catalogue writes a missing usage.
MISSING_TOKENS = frozenset({"", "NA", "N/A", "NaN", "nan", "None", "none", "null", "NULL"})
SPLITS = ("train", "val", "test")
# The catalogue's whole vocabulary of these columns (docs/dataset.md); another value is kept but
# flagged, as a typo or a file from elsewhere would be. Colours (46, open-ended) are not checked.
KNOWN_VALUES = {
    "gender": ("Men", "Women", "Unisex", "Boys", "Girls"),
    "season": ("Summer", "Fall", "Winter", "Spring"),
    "usage": ("Casual", "Sports", "Ethnic", "Formal", "Smart Casual", "Party", "Travel", "Home"),
}


class CaptionError(FashionSDError, ValueError):
    """Input the caption builder cannot use; the message names the file and what to do."""


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def template_errors(template: str) -> list[str]:
    """Problems with a caption template, for config validation."""
    try:
        names = template_fields(template)
    except ValueError as exc:
        return [f"'captions.template' is not a valid template ({exc}); use {{field}} placeholders"]
    known = set(DERIVED_FIELDS) | set(STYLE_COLUMNS)
    unknown = [n for n in names if n not in known]
    if unknown:
        return [f"'captions.template' has unknown field(s) {', '.join('{%s}' % n for n in unknown)}"
                f"; use {', '.join('{%s}' % n for n in dict.fromkeys([*DERIVED_FIELDS, *STYLE_COLUMNS[1:]]))}"]
    if not names:
        return ["'captions.template' has no {field}: every image would get the same caption"]
    try:  # the fields are filled with text: a spec such as {year:04d} cannot apply to it
        template.format(**dict.fromkeys(names, "text"))
    except (ValueError, TypeError) as exc:
        return [f"'captions.template' cannot be filled ({exc}): its fields are text, so give "
                "them without a format spec or conversion, e.g. {year}"]
    return []
