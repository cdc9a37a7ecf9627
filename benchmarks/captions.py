"""Caption builder speed on a catalogue the size of the real one.

    python benchmarks/captions.py [--rows 44446] [--images 2000]

Writes a synthetic styles.csv with the real file's quirks (22 lines with commas in the name,
`NA` usages, float years, missing fields) and times the whole build without images; then times the
image check on small JPEGs with one thread and with `captions.image_workers` threads, in one run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._machine import describe  # noqa: E402
from fashion_sd.catalogue import article_types, captions  # noqa: E402
from fashion_sd.config import load_config  # noqa: E402

MASTER = {"Apparel": 0.48, "Accessories": 0.25, "Footwear": 0.21, "Personal Care": 0.054,
          "Free Items": 0.006}


def synthetic_styles(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    types = list(article_types.SINGULAR)
    genders = ["Men", "Women", "Unisex", "Boys", "Girls"]
    colours = ["Navy Blue", "Black", "White", "Grey", "Off White", "Red", "Blue", ""]
    seasons = ["Summer", "Fall", "Winter", "Spring", ""]
    usages = ["Casual", "Sports", "Ethnic", "Formal", "NA"]
    lines = [",".join(captions.STYLE_COLUMNS)]
    comma_rows = set(rng.choice(rows, 22, replace=False).tolist())
    for i in range(rows):
        year = f"{rng.integers(2007, 2020)}.0" if i % 7 else str(rng.integers(2007, 2020))
        name = "Brand Men, Blue Shirt" if i in comma_rows else "Brand Men Blue Shirt"
        lines.append(",".join([
            str(10000 + i), rng.choice(genders), rng.choice(list(MASTER), p=list(MASTER.values())),
            "Topwear", rng.choice(types), rng.choice(colours), rng.choice(seasons), year,
            rng.choice(usages), name]))
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=44446)
    ap.add_argument("--images", type=int, default=2000)
    args = ap.parse_args()
    cfg = load_config()
    print(f"machine: {describe()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        styles = tmp / "styles.csv"
        synthetic_styles(styles, args.rows)
        t0 = time.perf_counter()
        result = captions.build_captions(styles, cfg.captions, cfg.seed)
        captions.write_outputs(result, tmp / "captions.csv")
        dt = time.perf_counter() - t0
        print(f"captions, no images: {args.rows} rows in {dt:.2f} s ({args.rows / dt:,.0f} rows/s), "
              f"{result.summary['kept']} kept, {len(result.summary['recovered_lines'])} recovered")

        folder = tmp / "images"
        folder.mkdir()
        rng = np.random.default_rng(0)
        for i in range(args.images):
            pixels = rng.integers(0, 255, (2400 // 8, 1800 // 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
        paths = sorted(folder.iterdir())
        from fashion_sd.images import check_images

        times = {}
        for workers in (1, cfg.captions.image_workers):
            t0 = time.perf_counter()
            check_images(paths, workers)
            times[workers] = time.perf_counter() - t0
            print(f"image check, {workers} thread(s): {args.images / times[workers]:,.0f} images/s")
        print(f"ratio {cfg.captions.image_workers} threads / 1 thread: "
              f"{times[1] / times[cfg.captions.image_workers]:.2f}x faster")


if __name__ == "__main__":
    main()
