"""The project's one on-disk cache: arrays keyed by everything they were computed from.

Pure numpy (no TensorFlow), so the FID numerics and the caption builder can use it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from fashion_sd import remote
from fashion_sd.files import atomic_path

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def file_id(path: str) -> list:
    """What identifies a file's content cheaply: path, size and modification time."""
    if remote.is_remote(path):
        import tensorflow as tf

        st = tf.io.gfile.stat(path)
        return [path, st.length, st.mtime_nsec]
    st = Path(path).stat()
    return [path, st.st_size, st.st_mtime_ns]


def cache_key(kind: str, weights_id: str, items: list, resolution: int | None = None,
              dtype: str | None = None) -> dict:
    """What a cache depends on; its hash names the file, the whole of it is stored inside.

    ``dtype`` is the compute dtype of the encoder that made it: bfloat16 encodings differ from
    float32 ones, so a run in one precision never reuses the other's.
    """
    key = {"version": CACHE_VERSION, "kind": kind, "weights": weights_id,
           "resolution": resolution, "items": items}
    if dtype is not None:
        key["dtype"] = dtype
    return key


def key_path(folder: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return folder / f"{key['kind']}-{digest}.npz"


def cached(folder: str | Path, key: dict, compute) -> np.ndarray:
    """The array for ``key`` from ``folder``, or ``compute()`` saved there (atomically).

    A file is reused only if the key stored in it equals ``key`` exactly; otherwise (a changed
    image, other weights, a hash collision, a damaged file) it is rebuilt.
    """
    path = key_path(Path(folder), key)
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if json.loads(str(z["key"])) == key:
                    log.info("cache hit: %s", path)
                    return z["data"]
            log.warning("cache %s was made for other inputs: rebuilding it", path)
        except Exception as exc:  # noqa: BLE001 - any unreadable cache is rebuilt
            log.warning("cache %s is unreadable (%s): rebuilding it", path, exc)
    data = compute()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, data=data, key=np.array(json.dumps(key, sort_keys=True)))
    return data
