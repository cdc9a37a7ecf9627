"""Batches per second the numpy batch source delivers at 512 px (issue 28): does the GPU wait?

    python benchmarks/batches.py [--rows 2048] [--batch 8] [--steps 300] [--cache-dtype float16]
    KERAS_BACKEND=jax .venv-jax/bin/python benchmarks/batches.py       # no TensorFlow

Writes a synthetic encoder cache as a run reads it (fashion_sd/training/shards.py: VAE moments
(rows, 2, 64, 64, 8) in shards of 1024 rows, text contexts (captions, 77, 768) float32, both
memory-mapped) in a temporary folder, then reads ``--steps`` train batches of ``--batch`` in
order, as Keras' ``fit`` does, from ``data.TrainBatches``: gathered with flips and caption
dropout, plus the step's Philox draws (fashion_sd/training/draws.py). Printed: batches/s with
the default read-ahead (``data.AHEAD`` batches on ``data.THREADS`` threads), with none (one
thread), and, on TensorFlow, through the tf.data pipeline; then how long a step of
``--step-ms`` waits for its batch, with and without the read-ahead. The
cache was just written, so its pages are in memory (a warm cache); a cold read from disk adds
the disk's random-read time per image (1 MB at float16).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    from fashion_sd.host import cpu_name

    cpu = cpu_name()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu}, {os.cpu_count()} CPUs ({usable} usable), Python {platform.python_version()}, "
            f"numpy {np.__version__}")


def synthetic_cache(folder: Path, rows: int, captions: int, dtype: str):
    from fashion_sd.training import data, shards

    rng = np.random.default_rng(0)

    def moments(a, b):
        return rng.standard_normal((b - a, 2, 64, 64, 8), dtype=np.float32)

    def contexts(a, b):
        return rng.standard_normal((b - a, 77, 768), dtype=np.float32)

    m = shards.sharded(folder, {"kind": "images"}, rows, moments, dtype)
    c = shards.sharded(folder, {"kind": "text"}, captions, contexts, "float32")
    index = np.arange(rows) % (captions - 1) + 1
    return data.EncodedData(m, c, index, {"train": np.arange(rows), "val": np.arange(0),
                                          "test": np.arange(0)}, uncond_index=0)


def rate(batches, steps: int) -> tuple[float, float]:
    """(batches/s, slowest batch in ms) reading ``steps`` batches in order."""
    it = iter(batches)
    next(it)  # the first batch starts the read-ahead (or tf.data's threads)
    slowest, t0 = 0.0, time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        next(it)
        slowest = max(slowest, time.perf_counter() - t)
    return steps / (time.perf_counter() - t0), slowest * 1e3


def wait(batches, steps: int, step_ms: float) -> float:
    """Mean ms a training step waits for its batch when each step takes ``step_ms`` (a sleep:
    the host waits for the accelerator and leaves its CPUs to the read-ahead)."""
    it = iter(batches)
    next(it)
    waited = 0.0
    for _ in range(steps):
        time.sleep(step_ms / 1e3)
        t = time.perf_counter()
        next(it)
        waited += time.perf_counter() - t
    return waited / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--captions", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--cache-dtype", choices=("float16", "float32"), default="float16")
    ap.add_argument("--step-ms", type=float, default=50.0,
                    help="a training step's time, for the wait per step (0: not measured)")
    args = ap.parse_args()

    import keras

    from fashion_sd.training import data

    print(f"machine: {machine()}\nKeras {keras.__version__} on {keras.config.backend()}; "
          f"{args.rows} images at 512 px (moments 64x64x8, {args.cache_dtype}), batch "
          f"{args.batch}, {args.steps} batches")
    plan = data.Batches(args.batch, seed=0, flip=True, caption_dropout=0.1)
    end = args.steps + 1
    with tempfile.TemporaryDirectory() as tmp:
        enc = synthetic_cache(Path(tmp), args.rows, args.captions, args.cache_dtype)
        runs = [(f"TrainBatches, read-ahead {data.AHEAD} on {data.THREADS} threads",
                 data.TrainBatches(enc, plan, 0, end)),
                ("TrainBatches, no read-ahead (1 thread)",
                 data.TrainBatches(enc, plan, 0, end, ahead=0))]
        if keras.config.backend() == "tensorflow":
            runs.append(("tf.data pipeline (the same numpy batches)",
                         data.train_dataset(enc, plan, 0, end)))
        for name, batches in runs:
            per_s, slowest = rate(batches, args.steps)
            print(f"{name:<48} {per_s:7.1f} batches/s  ({1e3 / per_s:5.1f} ms each, "
                  f"slowest {slowest:5.1f} ms)", flush=True)
        if args.step_ms:
            for name, ahead in ((f"read-ahead {data.AHEAD}", data.AHEAD), ("no read-ahead", 0)):
                batches = data.TrainBatches(enc, plan, 0, min(end, 101), ahead=ahead)
                print(f"behind a {args.step_ms:g} ms step, {name:<16} the step waits "
                      f"{wait(batches, min(args.steps, 100), args.step_ms):6.2f} ms a batch",
                      flush=True)


if __name__ == "__main__":
    main()
