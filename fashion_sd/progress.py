"""Progress bars for long loops (tqdm on stderr), shared by training, generation and evaluation."""

from __future__ import annotations

import sys


def tqdm_progress(iterable, desc, total=None):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, unit="batch")
