"""A seeded train/val/test split, stratified by a label (the article type)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fashion_sd.caption_template import SPLITS


def allocate(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Split ``n`` items by ``fractions``: floors, then the leftovers by largest remainder.

    Ties go to the earlier split, so train is served first. Sums to ``n`` exactly.
    """
    exact = [n * f for f in fractions]
    counts = [int(np.floor(x)) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def assign_splits(labels: pd.Series, fractions: tuple[float, float, float], min_count: int,
                  rng: np.random.Generator) -> pd.Series:
    """Seeded train/val/test for each row, stratified by ``labels`` where a class is large enough.

    Classes with at least ``min_count`` rows are split on their own; the rare ones are pooled and
    split together, so a class of 3 is not forced into 3 splits of 1.
    """
    out = pd.Series("", index=labels.index, dtype=object)
    counts = labels.value_counts()
    large = sorted(counts.index[counts >= min_count])
    groups = [labels.index[labels == c] for c in large]
    rare = labels.index[~labels.isin(large)]
    if len(rare):
        groups.append(rare)
    for idx in groups:
        idx = rng.permutation(np.asarray(idx))
        start = 0
        for name, k in zip(SPLITS, allocate(len(idx), fractions)):
            out.loc[idx[start:start + k]] = name
            start += k
    return out
