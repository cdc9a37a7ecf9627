"""Host memory of the encoder cache as the catalogue grows: shards (now) against one array (before).

    python benchmarks/cache.py [--rows 1000 10000 44446] [--shard-rows 1024]

For each catalogue size a fresh process encodes a synthetic catalogue at 64 px with a tiny image
and text encoder (the real pipeline around them: ``data.encode_dataset``, ``tf.data`` decoding,
the train batches) and then takes 2 training steps of a tiny U-Net; it prints its peak RSS and the
seconds it took. ``shards`` is the cache as it is now (fashion_sd/training/shards.py: shards written one
at a time, read memory-mapped per batch); ``one array`` is the cache as it was (every encoding
concatenated in memory, saved as one .npz with fashion_sd.cache.cached, loaded whole), measured in
the same run. The rows reuse the 48 bundled product photos, so no 44k-file folder is written; each row
is decoded and encoded on its own all the same.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_components():
    import keras

    from fashion_sd.sd.tokenizer import clip_tokenizer

    images = keras.Input((64, 64, 3))
    moments = keras.layers.Conv2D(8, 8, strides=8, name="moments")(images)  # (8, 8, 8)
    scaled = keras.layers.Lambda(lambda m: m[..., :4] * 0.18215, name="scaled_mean")(moments)
    tokens, positions = keras.Input((77,), dtype="int32"), keras.Input((77,), dtype="int32")
    text = keras.layers.Dense(768)(keras.layers.Embedding(49408, 8)(tokens))

    class Source:
        id = "benchmark-tiny"

    class Comps:
        source = Source()
        tokenizer = clip_tokenizer()
        image_encoder = keras.Model(images, scaled)
        text_encoder = keras.Model([tokens, positions], text)
    return Comps()


def child(rows: int, mode: str, folder: Path, shard_rows: int) -> dict:
    import numpy as np
    import pandas as pd
    import tensorflow as tf

    from fashion_sd.config import DataConfig
    from fashion_sd.sd import tokenizer
    from fashion_sd.training import data
    from fashion_sd.cache import cache_key, cached, file_id
    from tests.tiny import tiny_unet

    t0 = time.perf_counter()
    photos = sorted((ROOT / "data/demo/images").glob("*.jpg"))
    table = pd.DataFrame({
        "image_path": [str(photos[i % len(photos)]) for i in range(rows)],
        # one distinct caption per 6 rows: the full catalogue's 44k photos have about 7k (its
        # text encodings are the 1.7 GB the issue counts)
        "caption": [f"an image of a {2010 + i % 8} Casual Fall White Men's Shirt {i % max(1, rows // 6)}"
                    for i in range(rows)],
        "split": ["train"] * rows})
    comps = tiny_components()
    cache_dir = folder / f"{mode}-{rows}"
    if mode == "shards":
        enc = data.encode_dataset(table, comps, DataConfig(cache_dir=str(cache_dir), resolution=64, shard_rows=shard_rows))
    else:  # the cache as it was: one array, computed whole, saved and loaded whole
        paths = table.image_path.tolist()
        distinct = sorted(set(table.caption) | {""})
        tokens, _ = tokenizer.tokenize(distinct, comps.tokenizer)
        contexts = cached(cache_dir, cache_key("text", "t", distinct),
                          lambda: data.encode_text(comps.text_encoder, tokens))
        moments = cached(cache_dir, cache_key("images", "t", [file_id(p) for p in paths], 64),
                         lambda: data.encode_images(comps.image_encoder, paths, 64))
        index = {c: i for i, c in enumerate(distinct)}
        enc = data.EncodedData(moments, contexts, np.array([index[c] for c in table.caption]),
                               {"train": np.arange(rows), "val": np.arange(0), "test": np.arange(0)},
                               index[""])
    encoded = time.perf_counter() - t0
    import keras

    unet = tiny_unet(8)
    opt = keras.optimizers.SGD(1e-3)
    for batch in data.train_dataset(enc, data.Batches(8, 0, True), 0, 2):
        with tf.GradientTape() as tape:
            latents = batch["moments"][..., :4]
            t = tf.zeros((8, 320))
            loss = tf.reduce_mean((unet([latents, t, batch["context"]]) - batch["noise"]) ** 2)
        opt.apply_gradients(zip(tape.gradient(loss, unet.trainable_variables),
                                unet.trainable_variables))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": rows, "mode": mode, "peak_rss_mb": round(peak_mb), "encode_s":
            round(encoded, 1), "total_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1000, 10000, 44446])
    ap.add_argument("--shard-rows", type=int, default=1024)
    ap.add_argument("--child", nargs=3, metavar=("ROWS", "MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        rows, mode, folder = args.child
        print(json.dumps(child(int(rows), mode, Path(folder), args.shard_rows)))
        return
    from benchmarks._machine import describe

    print(f"machine: {describe()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            for mode in ("shards", "one-array"):
                out = subprocess.run([sys.executable, __file__, "--shard-rows", str(args.shard_rows),
                                      "--child", str(rows), mode, tmp],
                                     capture_output=True, text=True, check=True)
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                r = results[-1]
                print(f"{rows:>6} rows  {mode:<9}  peak RSS {r['peak_rss_mb']:>6} MB  "
                      f"encode {r['encode_s']:>6} s  encode + 2 steps {r['total_s']:>6} s",
                      flush=True)
    by = {(r["rows"], r["mode"]): r["peak_rss_mb"] for r in results}
    lo, hi = min(args.rows), max(args.rows)
    for mode in ("shards", "one-array"):
        print(f"{mode}: peak RSS at {hi} rows / at {lo} rows = {by[hi, mode] / by[lo, mode]:.2f}x "
              f"(+{by[hi, mode] - by[lo, mode]} MB)")


if __name__ == "__main__":
    main()
