"""Reading the real ``styles.csv`` as it is (unquoted commas, float years, ``NA``), no TensorFlow."""

from __future__ import annotations

import csv
from decimal import Decimal, InvalidOperation
from pathlib import Path

import pandas as pd

from fashion_sd.caption_template import (
    MISSING_TOKENS,
    REQUIRED_COLUMNS,
    STYLE_COLUMNS,
    CaptionError,
)


def read_styles(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, list[int]]:
    """Read ``styles.csv`` as it is: returns (rows, malformed rows, recovered line numbers).

    Lines with more fields than the header are recovered by joining the extras back into the
    last column (``productDisplayName`` is unquoted free text with commas in 22 real lines).
    Lines with fewer fields cannot be placed and are returned as malformed, never shifted; so are
    lines whose id is a number no integer column holds (:func:`id_problem`).
    All values are strings with surrounding spaces removed; missing values are None.
    The ``line`` column holds each row's line number in the file (the header is line 1).

    Hand-written over the csv module rather than ``pandas.read_csv(on_bad_lines=callable)``,
    because pandas passes the callable no line number and silently pads short lines.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionError(f"{path}: styles file not found (pass --styles PATH/styles.csv)")
    rows, bad, recovered = [], [], []
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise CaptionError(
                    f"{path}: missing required column(s) {', '.join(missing)}; found "
                    f"{', '.join(header) or 'no header'}. Expected the Kaggle styles.csv header: "
                    f"{','.join(STYLE_COLUMNS)}")
            n = len(header)
            for fields in reader:
                line = reader.line_num
                if not fields:
                    continue  # blank line
                if len(fields) > n:
                    fields = fields[: n - 1] + [",".join(fields[n - 1:])]
                    recovered.append(line)
                elif len(fields) < n:
                    bad.append({"line": line, "id": fields[0].strip(),
                                "reason": f"malformed: {len(fields)} fields, expected {n}"})
                    continue
                reason = id_problem(fields[0])
                if reason:
                    bad.append({"line": line, "id": fields[0].strip(), "reason": reason})
                    continue
                fields[0] = _whole(fields[0])
                rows.append([line, *fields])
    except UnicodeDecodeError as exc:
        raise CaptionError(f"{path}: not UTF-8 text ({exc}); re-save it as UTF-8") from None
    df = pd.DataFrame(rows, columns=["line", *header], dtype=object)
    for col in header:
        values = df[col].str.strip()
        df[col] = values.where(~values.isin(MISSING_TOKENS), None)
    df["year"] = df["year"].map(normalise_year)
    return df, pd.DataFrame(bad, columns=["line", "id", "reason"]), recovered


def normalise_year(value: str | None) -> str | None:
    """``'2011.0'`` -> ``'2011'`` (pandas wrote floats); anything not a whole number is missing."""
    if value is None:
        return None
    try:
        year = float(value)
    except ValueError:
        return None
    return str(int(year)) if year.is_integer() else None


# Ids are read into a 64-bit integer column (and name the image file {id}.jpg).
ID_LIMIT = 2**63


def id_problem(text: str) -> str | None:
    """Why a numeric id cannot be an id: a whole number outside the 64-bit range (``1e30`` would
    wrap to -9223372036854775808, and a second such id would be called a duplicate). Text that
    is no number at all, or not whole, is left to the captions' own "invalid id"."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        return None
    if value.is_finite() and value == value.to_integral_value() and abs(value) >= ID_LIMIT:
        return "invalid id: does not fit a 64-bit integer"
    if value.is_infinite():
        return "invalid id: not a finite number"
    return None


def _whole(text: str) -> str:
    """A whole-number id as its digits (``2e3`` -> ``2000``), so the integer column is read from
    digits, exactly, not through a float; anything else as it is."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        return text
    return str(int(value)) if value.is_finite() and value == value.to_integral_value() else text
