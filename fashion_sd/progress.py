"""Progress bars for long loops (tqdm on stderr), shared by training, generation and evaluation."""

from __future__ import annotations

import sys

from tqdm import tqdm


def tqdm_progress(iterable, desc, total=None):

    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, unit="batch")
