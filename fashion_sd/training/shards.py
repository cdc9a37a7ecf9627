"""Encoder caches larger than memory: rows in fixed-size shards, each written atomically, read
row by row from memory-mapped files.

The full catalogue at 512 px has 11.6 GB of VAE moments (float32), more than a Colab machine's
RAM, and an hour of encoding that a disconnect must not lose. So a cache is a folder:

    {kind}-{digest}/key.json            what it was computed from (cache.cache_key + storage)
    {kind}-{digest}/shard-00000.npy     rows [0, R), then [R, 2R), ... each written whole
    {kind}-{digest}/index.json          written last: rows, row shape, stored dtype

An interrupted encoding resumes at the first missing shard. A finished cache is served by
:class:`ShardedArray`, which maps only the shards a batch touches and lets them go again, so host
memory does not grow with the catalogue. numpy only (``.npy`` is numpy's own format;
``np.load(mmap_mode="r")`` its memory map), so the caption builder and tests stay light.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from fashion_sd.errors import FashionSDError
from fashion_sd.files import atomic_path, atomic_write_text, human_size
from fashion_sd.cache import key_path

log = logging.getLogger(__name__)

ROWS_PER_SHARD = 1024
STORE_DTYPES = ("float32", "float16")


class ShardedArray:
    """A read-only (rows, *row_shape) array over a finished shard folder, served as float32.

    ``a[rows]`` and ``a[rows, cols]`` gather like numpy fancy indexing on the first (and second)
    axis; each call opens the shards it needs as memory maps and drops them after copying.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        self.rows, self.rows_per_shard = int(index["rows"]), int(index["rows_per_shard"])
        self.row_shape = tuple(index["row_shape"])
        self.stored_dtype = index["dtype"]
        self.dtype = np.dtype(np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *self.row_shape)

    def __len__(self) -> int:
        return self.rows

    def shard(self, i: int) -> np.ndarray:
        return np.load(self.folder / f"shard-{i:05d}.npy", mmap_mode="r")

    def __getitem__(self, item) -> np.ndarray:
        rows, rest = (item[0], item[1:]) if isinstance(item, tuple) else (item, ())
        rows = np.asarray(rows)
        scalar = rows.ndim == 0
        rows = np.atleast_1d(rows).astype(np.int64)
        rows = np.where(rows < 0, rows + self.rows, rows)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"row index out of range for {self.rows} rows")
        rest = tuple(np.broadcast_to(np.asarray(r), rows.shape) for r in rest)
        out = None
        shards = rows // self.rows_per_shard
        for s in np.unique(shards):
            pick = shards == s
            local = rows[pick] - s * self.rows_per_shard
            block = np.asarray(self.shard(int(s))[(local, *(r[pick] for r in rest))],
                               dtype=np.float32)
            if out is None:
                out = np.empty((len(rows), *block.shape[1:]), np.float32)
            out[pick] = block
        if out is None:
            out = np.empty((0, *self.row_shape[len(rest):]), np.float32)
        return out[0] if scalar else out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole array in memory (small caches and tests only)."""
        return self[np.arange(self.rows)].astype(dtype or np.float32)


def shard_folder(folder: str | Path, key: dict) -> Path:
    return key_path(Path(folder), key).with_suffix("")


class CacheSpaceError(FashionSDError, OSError):
    """A cache that would not fit on its disk; found before encoding starts."""


def check_space(out: Path, rows: int, row_nbytes: int, what: str) -> None:
    """Refuse to start encoding ``rows`` rows of ``row_nbytes`` when the disk has less room
    (5% slack for the .npy headers and the index): better now than a full disk an hour in."""
    needed = int(rows * row_nbytes * 1.05)
    free = shutil.disk_usage(out).free
    if free < needed:
        raise CacheSpaceError(
            f"data.cache_dir {out.parent}: the {what} cache needs about {human_size(needed)} for "
            f"{rows} rows still to encode, and the disk has {human_size(free)} free; free some "
            "space or set data.cache_dir to a larger disk (data.cache_dtype: float16 halves the "
            "image cache)")


def sharded(folder: str | Path, key: dict, rows: int, compute, store_dtype: str = "float32",
            rows_per_shard: int = ROWS_PER_SHARD, progress=None, on_write=None,
            row_shape: tuple | None = None) -> ShardedArray:
    """The shard folder for ``key`` under ``folder``, computing what is missing.

    ``compute(start, stop)`` returns rows [start, stop) as an array. ``key`` gains the storage
    (dtype, rows per shard), so a float16 cache is never read as a float32 one. Shards already
    written for the same key are kept: an interrupted encoding resumes where it stopped. A
    folder made for another key (a hash collision, a damaged key file) is rebuilt.
    ``on_write()`` is called after each shard and after the index (a remote cache's push).
    ``row_shape``, when known beforehand, lets the free space be checked before any encoding.
    """
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {STORE_DTYPES}, got {store_dtype!r}")
    key = {**key, "store_dtype": store_dtype, "rows_per_shard": rows_per_shard}
    out = shard_folder(folder, key)
    stored = out / "key.json"
    text = json.dumps(key, sort_keys=True)
    if out.is_dir():
        try:
            same = json.loads(stored.read_text()) == key
        except (OSError, ValueError):
            same = False
        if not same:
            log.warning("cache %s was made for other inputs: rebuilding it", out)
            shutil.rmtree(out)
    if (out / "index.json").is_file():
        log.info("cache hit: %s", out)
        return ShardedArray(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stored, text)
    n_shards = -(-rows // rows_per_shard)
    todo = [i for i in range(n_shards) if not _valid(out / f"shard-{i:05d}.npy")]
    if row_shape is not None and todo:
        todo_rows = sum(min(rows, (i + 1) * rows_per_shard) - i * rows_per_shard for i in todo)
        check_space(out, todo_rows, int(np.prod(row_shape)) * np.dtype(store_dtype).itemsize,
                    str(key.get("kind", "encoder")))
    if len(todo) < n_shards:
        print(f"{out.name}: {n_shards - len(todo)} of {n_shards} shards already encoded; "
              "resuming")
    row_shape = None
    for i in (progress(todo, f"encoding {key.get('kind', '')} shards", len(todo))
              if progress else todo):
        start, stop = i * rows_per_shard, min(rows, (i + 1) * rows_per_shard)
        block = np.asarray(compute(start, stop))
        if len(block) != stop - start:
            raise ValueError(f"compute({start}, {stop}) returned {len(block)} rows")
        with atomic_path(out / f"shard-{i:05d}.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, block.astype(store_dtype))
        row_shape = block.shape[1:]
        if on_write:
            on_write()
    if row_shape is None:  # every shard was there already
        row_shape = np.load(out / "shard-00000.npy", mmap_mode="r").shape[1:] if rows else ()
    atomic_write_text(out / "index.json", json.dumps(
        {"rows": rows, "rows_per_shard": rows_per_shard, "row_shape": list(row_shape),
         "dtype": store_dtype}))
    if on_write:
        on_write()
    return ShardedArray(out)


def _valid(path: Path) -> bool:
    """A shard that exists and whose header reads (atomic writes leave no partial ones; this
    also catches files damaged since)."""
    try:
        np.load(path, mmap_mode="r")
        return True
    except (OSError, ValueError):
        return False
