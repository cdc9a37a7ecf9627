"""The caption build step: Kaggle ``styles.csv`` -> one caption per image, with a seeded, stratified
train/val/test split (reading: :mod:`styles`; grammar: :mod:`caption_text`; splits: :mod:`splits`).

Pure pandas and Pillow: no TensorFlow import (only captions over CLIP's 77 tokens by a cheap bound
load the real tokenizer). The real file's quirks are handled as ``docs/dataset.md`` describes them:
unquoted commas in ``productDisplayName`` (22 lines), float years, the literal ``NA``, missing
fields, ids without an image. Nothing is dropped silently: every row that does not reach the output
is in :attr:`CaptionResult.dropped` with its line, stage and reason.

Example:
    >>> from fashion_sd.config import load_config
    >>> cfg = load_config("configs/demo.yaml")
    >>> result = build_captions("data/demo/styles.csv", cfg.captions, seed=cfg.seed)
    >>> result.table.caption.iloc[0]
    "an image of a 2011 Sports Summer Blue Men's T-Shirt"
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fashion_sd import images, remote
from fashion_sd.catalogue.article_types import SINGULAR
from fashion_sd.catalogue.caption_text import render_captions
from fashion_sd.catalogue.splits import assign_splits
from fashion_sd.catalogue.styles import read_styles
from fashion_sd.caption_template import (
    DERIVED_FIELDS,
    KNOWN_VALUES,
    SPLITS,
    CaptionError,
    template_errors,
)
from fashion_sd.files import atomic_path
from fashion_sd.sd import tokenizer

if TYPE_CHECKING:
    from fashion_sd.config import CaptionsConfig

logger = logging.getLogger(__name__)
OUTPUT_COLUMNS = ("id", "image_path", "caption", "split")
FLAGGED_COLUMNS = ("line", "id", "column", "value", "note")


def flag_unusual(kept: pd.DataFrame) -> pd.DataFrame:
    """Kept rows whose gender, season, usage or article type is outside the catalogue's
    vocabulary: captioned as written, and listed so a typo is seen (``flagged.csv``)."""

    known = {**{col: set(values) for col, values in KNOWN_VALUES.items()},
             "articleType": set(SINGULAR)}
    rows = []
    for col, values in known.items():
        odd = kept[col].notna() & ~kept[col].isin(values)
        note = ("not in the catalogue's vocabulary; kept as written" if col != "articleType" else
                "not in fashion_sd.catalogue.article_types.SINGULAR; captioned with a rule-based singular")
        rows += [(line, str(i), col, v, note)
                 for line, i, v in zip(kept.loc[odd, "line"], kept.loc[odd, "id"], kept.loc[odd, col])]
    return pd.DataFrame(rows, columns=FLAGGED_COLUMNS).sort_values("line", kind="stable",
                                                                    ignore_index=True)


# --------------------------------------------------------------------------------------------
# The whole build


@dataclass
class CaptionResult:
    table: pd.DataFrame  # kept rows: id, image_path (absolute or None), caption, split, sources
    dropped: pd.DataFrame  # line, id, stage, reason
    summary: dict[str, Any] = field(default_factory=dict)
    flagged: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=FLAGGED_COLUMNS))

    def sample_captions(self, k: int = 10, seed: int = 0) -> list[str]:
        distinct = self.table.caption.drop_duplicates()
        return distinct.sample(min(k, len(distinct)), random_state=seed).tolist()


def _category_reason(row_values: dict[str, str | None], cfg: CaptionsConfig) -> str | None:
    for col, allowed in cfg.include.items():
        if allowed and row_values[col] not in allowed:
            return f"{col} {row_values[col]!r} not in include list"
    for col, banned in cfg.exclude.items():
        if row_values[col] in banned:
            return f"excluded {col} {row_values[col]}"
    return None


class _Rows:
    """The styles rows still in play and those dropped so far, each with its stage and reason."""

    def __init__(self, df: pd.DataFrame, malformed: pd.DataFrame):
        self.df, self.dropped = df, [malformed.assign(stage="parse")]

    def drop(self, mask: pd.Series, stage: str, reasons) -> None:
        gone = self.df.loc[mask, ["line", "id"]].assign(stage=stage, reason=reasons)
        gone["id"] = gone["id"].astype(str)  # as written in the file, invalid ones included
        self.dropped.append(gone)
        self.df = self.df.loc[~mask]


def build_captions(
    styles: str | Path,
    cfg: CaptionsConfig,
    seed: int,
    images_dir: str | Path | None = None,
    progress=None,
) -> CaptionResult:
    """Read, filter, caption, check images (if ``images_dir``), sample and split.

    ``progress`` wraps the image-check iterator (e.g. ``functools.partial(tqdm, total=n)``).
    The same inputs and seed give the same result, row for row.
    """
    if errs := template_errors(cfg.template):
        raise CaptionError("; ".join(errs))
    df, malformed, recovered = read_styles(styles)
    rows_read = len(df) + len(malformed)
    rows = _Rows(df, malformed)
    _keep_valid_ids(rows)
    _keep_configured(rows, cfg)
    df = rows.df.assign(caption=render_captions(rows.df, cfg.template))
    sample_rng, split_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    keep, rejected, paths = _sample_usable(df, cfg, sample_rng, images_dir, progress)
    positions = np.arange(len(df))
    rej_mask = np.isin(positions, list(rejected))
    rows.dropped.append(df.iloc[rej_mask][["line", "id"]].astype({"id": str}).assign(
        stage="image", reason=[rejected[i] for i in positions[rej_mask]]))
    kept = df.iloc[sorted(keep)].copy()
    kept["image_path"] = [paths[i] for i in sorted(keep)]
    s = cfg.split
    kept["split"] = assign_splits(kept["articleType"], (s.train, s.val, s.test),
                                  cfg.stratify_min_count, split_rng)
    sources = [c for c in df.columns if c not in ("line", "id", "caption")]
    table = kept[[*OUTPUT_COLUMNS, *sources]].reset_index(drop=True)
    dropped_df = pd.concat(rows.dropped, ignore_index=True)[["line", "id", "stage", "reason"]]
    dropped_df = dropped_df.sort_values("line", kind="stable").reset_index(drop=True)
    if table.empty:
        raise CaptionError(
            f"{styles}: no rows left after filtering ({_reason_text(dropped_df)}); "
            "check captions.include / captions.exclude and the image folder")
    summary = {"rows_read": rows_read, "recovered_lines": recovered,
               "sampled_out": len(df) - len(keep) - len(rejected)}
    return _result(table, kept, dropped_df, summary, cfg)


def _keep_valid_ids(rows: _Rows) -> None:
    """Whole-number ids, each once (the first occurrence wins)."""
    ids = pd.to_numeric(rows.df["id"], errors="coerce")
    rows.drop(ids.isna() | (ids % 1 != 0), "parse", "invalid id")
    rows.df = rows.df.assign(id=pd.to_numeric(rows.df["id"]).astype("int64"))
    rows.drop(rows.df["id"].duplicated(), "parse", "duplicate id")


def _keep_configured(rows: _Rows, cfg: CaptionsConfig) -> None:
    """A caption needs a garment noun, and the configured categories."""
    rows.drop(rows.df["articleType"].isna(), "filter", "missing articleType")
    columns = list(dict.fromkeys([*cfg.include, *cfg.exclude]))
    if columns:
        reasons = pd.Series([_category_reason(r, cfg) for r in rows.df[columns].to_dict("records")],
                            index=rows.df.index, dtype=object)
        mask = reasons.notna()
        rows.drop(mask, "filter", reasons[mask])


def _sample_usable(df: pd.DataFrame, cfg: CaptionsConfig, rng, images_dir, progress):
    """(kept positions, {position: why rejected}, image paths): walk a seeded permutation and
    keep the first ``max_images`` rows whose image is usable, so a sample of 850 never opens
    all 44k images."""
    order = rng.permutation(len(df)) if cfg.max_images else np.arange(len(df))
    target = min(cfg.max_images or len(df), len(df))
    paths: list[Path | None] = [None] * len(df)
    if images_dir is not None:
        index = images.index_folder(images_dir)
        paths = [index.get(str(i)) for i in df["id"]]
        paths = [images.resolved(p) if p is not None else None for p in paths]
    keep: list[int] = []
    rejected: dict[int, str] = {}
    first_with: dict[str, int] = {}  # an image's digest -> the first kept row showing it
    pos = 0
    while len(keep) < target and pos < len(order):
        chunk = order[pos: pos + (target - len(keep))]
        pos += len(chunk)
        if images_dir is None:
            keep.extend(chunk.tolist())
            continue
        wrapped = None
        if progress is not None:
            wrapped = lambda it, n=len(chunk): progress(it, total=n)  # noqa: E731
        results = images.check_images([paths[i] for i in chunk], cfg.image_workers, wrapped,
                                      images.inspect_image)
        for i, (reason, digest) in zip(chunk.tolist(), results):
            if reason is None and digest in first_with:
                # the same photo under a second id: kept, the split could put one copy in
                # train and the other in test, and the model be scored on what it trained on
                first = first_with[digest]
                reason = (f"duplicate image: the same file as id {df['id'].iloc[first]} "
                          f"({paths[first].name})")
            if reason is None:
                keep.append(i)
                first_with[digest] = i
            else:
                rejected[i] = reason
    return keep, rejected, paths


def _result(table, kept, dropped_df, counts: dict, cfg: CaptionsConfig) -> CaptionResult:
    """The result with its summary (counts, splits, token limits, missing and unusual values)."""
    missing = {col: int(kept[col].isna().sum()) for col in DERIVED_FIELDS.values()}
    summary = {
        "rows_read": counts["rows_read"],
        "recovered_lines": counts["recovered_lines"],
        "dropped_by_stage_reason": _counts(dropped_df),
        "sampled_out": counts["sampled_out"],
        "kept": len(table),
        "per_split": {name: int((table.split == name).sum()) for name in SPLITS},
        "distinct_captions": int(table.caption.nunique()),
        "missing_fields_in_kept": {k: v for k, v in missing.items() if v},
        "over_token_limit": tokenizer.over_limit(table.caption, cfg.max_tokens),
        "unusual_values": {},
    }
    flagged = flag_unusual(kept)
    for col, value in zip(flagged.column, flagged.value):
        values = summary["unusual_values"].setdefault(col, {})
        values[value] = values.get(value, 0) + 1
    return CaptionResult(table, dropped_df, summary, flagged)


def _counts(dropped: pd.DataFrame) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = {}
    for stage, reason in zip(dropped.stage, dropped.reason):
        out.setdefault(stage, Counter())[_reason_key(reason)] += 1
    return {stage: dict(c) for stage, c in out.items()}


def _reason_key(reason: str) -> str:
    # "truncated: image file is truncated (62 bytes not processed)" -> counted as "truncated"
    head = reason.split(":", 1)[0]
    return head if head in ("truncated", "unreadable", "duplicate image", "too narrow") else reason


def _reason_text(dropped: pd.DataFrame) -> str:
    counts = _counts(dropped)
    return "; ".join(f"{stage}: " + ", ".join(f"{r} {n}" for r, n in reasons.items())
                     for stage, reasons in counts.items()) or "no rows in the file"


def format_summary(summary: dict[str, Any], max_tokens: int = tokenizer.MAX_LENGTH) -> str:
    """The summary as the lines a person reads on stdout."""
    lines = [f"rows read: {summary['rows_read']}"]
    rec = summary["recovered_lines"]
    shown = ", ".join(map(str, rec[:10])) + (" ..." if len(rec) > 10 else "")
    lines.append(f"recovered (commas in productDisplayName): {len(rec)}"
                 + (f" (lines {shown})" if rec else ""))
    titles = {"parse": "dropped while parsing", "filter": "filtered", "image": "rejected (images)"}
    for stage in ("parse", "filter", "image"):
        reasons = summary["dropped_by_stage_reason"].get(stage, {})
        lines.append(f"{titles[stage]}: {sum(reasons.values())}")
        lines.extend(f"  {reason}: {n}" for reason, n in sorted(reasons.items(), key=lambda x: -x[1]))
    if summary["sampled_out"]:
        lines.append(f"not sampled (captions.max_images): {summary['sampled_out']}")
    split = summary["per_split"]
    lines.append(f"kept: {summary['kept']} (train {split['train']}, val {split['val']}, "
                 f"test {split['test']})")
    lines.append(f"distinct captions: {summary['distinct_captions']}")
    if summary["missing_fields_in_kept"]:
        parts = ", ".join(f"{k} {v}" for k, v in summary["missing_fields_in_kept"].items())
        lines.append(f"kept rows with a field left out of the caption: {parts}")
    for col, counts in summary.get("unusual_values", {}).items():
        shown = ", ".join(f"{v!r} {n}" for v, n in sorted(counts.items(), key=lambda x: -x[1])[:8])
        lines.append(f"unusual {col} (kept; see flagged.csv): {shown}")
    long = summary["over_token_limit"]
    lines.append(f"captions over CLIP's {max_tokens} tokens (would be truncated): {len(long)}")
    lines.extend(f"  {n} tokens: {text}" for text, n in list(long.items())[:5])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Files


def write_outputs(result: CaptionResult, out: str | Path) -> tuple[Path, Path]:
    """Write ``out`` (captions), ``rejected.csv`` and ``flagged.csv`` beside it, each atomically.

    ``image_path`` is written relative to the CSV's folder, so the folder can move with its
    images; :func:`read_captions` resolves it back.
    """
    out = Path(out)
    table = result.table.copy()
    base = out.resolve().parent
    table["image_path"] = [
        "" if p is None else Path(_relpath(p, base)).as_posix() for p in table.image_path]
    rejected = out.parent / "rejected.csv"
    flagged = out.parent / "flagged.csv"
    for frame, path in ((table, out), (result.dropped, rejected), (result.flagged, flagged)):
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False, lineterminator="\n")
    return out, rejected


def _relpath(path: Path, base: Path) -> str:
    try:
        return os.path.relpath(path, base)
    except ValueError:  # another drive on Windows
        return str(path)


def read_captions(path: str | Path) -> pd.DataFrame:
    """A ``captions.csv`` with ``image_path`` resolved against the CSV's folder.

    Split labels that match ``train``/``val``/``test`` only after trimming and lower-casing
    (``Train ``, a hand edit) are used so and reported; any other label is an error naming its
    row, never a silently dropped row.
    """
    url = str(path) if remote.is_remote(path) else None  # gs://... read through tf.io.gfile
    path = url or Path(path)
    if not remote.is_file(path):
        raise CaptionError(f"{path}: captions file not found; build it with scripts/build_captions.py"
                           if not remote.exists(path) else f"{path}: is a folder; give the captions CSV")
    try:
        with remote.open_file(path) as fh:
            df = pd.read_csv(fh, dtype={"caption": str, "image_path": str, "split": str},
                             keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError:
        raise CaptionError(f"{path}: not a UTF-8 text CSV; give the captions.csv that "
                           "scripts/build_captions.py wrote") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise CaptionError(f"{path}: not a readable CSV ({str(exc).strip()}); rebuild it with "
                           "scripts/build_captions.py") from None
    missing = [c for c in OUTPUT_COLUMNS if c not in df.columns]
    if missing:
        raise CaptionError(f"{path}: missing column(s) {', '.join(missing)}; rebuild it with "
                           "scripts/build_captions.py")
    raw = df["split"].astype(str)
    split = raw.str.strip().str.lower()
    bad = ~split.isin(SPLITS)
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        raise CaptionError(f"{path}: line {i + 2}: split {raw.iloc[i]!r} is not one of "
                           f"{', '.join(SPLITS)} ({int(bad.sum())} such row(s)); fix the labels or "
                           "rebuild the file with scripts/build_captions.py")
    changed = (raw != split).to_numpy().nonzero()[0]
    if len(changed):
        i = int(changed[0])
        logger.warning("%s: %d split label(s) read after trimming and lower-casing, e.g. line %d "
                       "%r -> %r", path, len(changed), i + 2, raw.iloc[i], split.iloc[i])
    df["split"] = split
    empty = (df["caption"].str.strip() == "").to_numpy().nonzero()[0]
    if len(empty):
        raise CaptionError(f"{path}: line {int(empty[0]) + 2}: empty caption ({len(empty)} such "
                           "row(s)); fix it or rebuild the file with scripts/build_captions.py")
    # relative image paths (and masks, train.mask_background_weight) are the CSV's folder's
    for column in ("image_path", "mask"):
        if column not in df.columns:
            continue
        values = [p if isinstance(p, str) else "" for p in df[column]]
        if url:
            df[column] = [p if not p or remote.is_remote(p)
                          else remote.join(posixpath.dirname(url), p) for p in values]
        else:
            df[column] = [str((path.parent / p).resolve()) if p else "" for p in values]
    return df
