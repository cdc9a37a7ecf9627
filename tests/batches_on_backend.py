"""Draw a run's batches on the Keras backend ``KERAS_BACKEND`` names: a script, not a test.

``python tests/batches_on_backend.py DIR`` reads ``DIR/job.json`` (the encoder cache's shard
folders, caption rows, splits, and the batches to draw) and ``DIR/tokens.npy`` when the job has
token ids instead of contexts; it writes every batch of ``data.train_dataset`` and
``data.val_dataset`` to ``DIR/batches.npz`` (``train/<i>/<key>``, ``val/<i>/<key>``) and
``DIR/modules.json`` (the backend, whether tensorflow was imported). tests/training/test_draws.py
compares them with the TensorFlow pipeline's, bit for bit.
"""

import json
import sys
from pathlib import Path

import numpy as np

folder = Path(sys.argv[1])
job = json.loads((folder / "job.json").read_text())

import keras  # noqa: E402

from fashion_sd.training import data  # noqa: E402
from fashion_sd.training.shards import ShardedArray  # noqa: E402

tokens = np.load(folder / "tokens.npy") if job["tokens"] else None
encoded = data.EncodedData(
    moments=ShardedArray(job["moments"]),
    contexts=None if tokens is not None else ShardedArray(job["contexts"]),
    caption_index=np.array(job["caption_index"]),
    splits={k: np.array(v, dtype=np.int64) for k, v in job["splits"].items()},
    uncond_index=job["uncond_index"], tokens=tokens)
out = {}
train = data.train_dataset(encoded, data.Batches(**job["batches"]), *job["steps"])
for i in range(len(train)):
    for key, value in train[i].items():
        out[f"train/{i}/{key}"] = value
val = data.val_dataset(encoded, *job["val"])
for i in range(len(val)):
    for key, value in val[i].items():
        out[f"val/{i}/{key}"] = value
np.savez(folder / "batches.npz", **out)
(folder / "modules.json").write_text(json.dumps({
    "backend": keras.backend.backend(), "tensorflow": "tensorflow" in sys.modules,
    "train": type(train).__name__, "val": type(val).__name__}))
