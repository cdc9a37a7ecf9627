"""Calibration of the weight-free garment metrics (fashion_sd/evaluation/garment.py) on real
catalogue photos with their real labels.

    python benchmarks/garment_calibration.py --images DIR --styles CSV [--limit N] [--size 60x80]

Reads ``DIR/<id>.jpg`` for the ids of ``CSV`` (the catalogue's styles.csv: id, baseColour,
masterCategory), a seeded random ``--limit`` of them, and prints:

- colour accuracy over the photos whose colour it judged, against the best constant guess (the
  one palette name that, said of every photo, scores best under the same neighbour rule), and
  the share of the photos with a scorable label whose colour it judged;
- the cut-off rate on the real photos (whole garments: the lower the better) and on the same
  photos cropped through the garment (``garment.crop_through``: the higher the better), each
  over the photos it judged, with the shares judged; overall and per masterCategory.

``--size WxH`` resizes every photo first: copies of the catalogue stretched to squares (224x224)
get the catalogue's own 3:4 aspect back with ``--size 60x80``, the small catalogue's size, which
is also what the bundled photos have. docs/evaluation.md records the figures and their sample.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fashion_sd.evaluation import garment as g  # noqa: E402


def load(images: Path, styles: Path, limit: int | None, seed: int, size: tuple[int, int] | None):
    """(id, baseColour, masterCategory, RGB array) for the ids of ``styles`` with a photo."""
    import pandas as pd
    from PIL import Image

    table = pd.read_csv(styles, dtype=str, on_bad_lines="skip")
    rows = [r for r in table.itertuples() if (images / f"{r.id}.jpg").is_file()]
    random.Random(seed).shuffle(rows)
    out = []
    for r in rows[:limit]:
        with Image.open(images / f"{r.id}.jpg") as im:
            im = im.convert("RGB")
            out.append((r.id, r.baseColour, getattr(r, "masterCategory", "?"),
                        np.asarray(im.resize(size, Image.BICUBIC) if size else im)))
    return out


def judge(photos) -> list[dict]:
    """One record per photo: its label, judged colour, cut off as it is and cropped."""
    return [{"label": label, "category": category, "colour": (a := g.analyse(im)).colour,
             "cut_real": g.garment_cut_off(a), "cut_cropped": g.cut_off(g.crop_through(im))}
            for _, label, category, im in photos]


def _rate(values) -> tuple[float, float]:
    """(rate over the judged, share judged)."""
    judged = [v for v in values if v is not None]
    return (float(np.mean(judged)) if judged else float("nan"),
            len(judged) / len(values) if values else float("nan"))


def figures(records: list[dict]) -> dict:
    """The calibration figures of judged photos (the keys docs/evaluation.md quotes)."""
    scorable = [r for r in records if r["label"] in g.PALETTE]
    scored = [g.colour_correct(r["colour"], r["label"]) for r in scorable]
    accuracy, judged = _rate(scored)
    guesses = {name: np.mean([g.colour_correct(name, r["label"]) for r in scorable]) for name in g.PALETTE}
    best = max(guesses, key=guesses.get) if scorable else None
    real, real_judged = _rate([r["cut_real"] for r in records])
    cropped, cropped_judged = _rate([r["cut_cropped"] for r in records])
    return {"photos": len(records), "colour_accuracy": accuracy, "colour_judged_share": judged,
            "constant_guess": best, "constant_accuracy": float(guesses[best]) if best else float("nan"),
            "cut_off_real": real, "cut_off_real_judged_share": real_judged,
            "cut_off_cropped": cropped, "cut_off_cropped_judged_share": cropped_judged,
            "cut_off_gap": cropped - real}


def report(f: dict, name: str) -> str:
    return (f"{name:14s} {f['photos']:5d} photos | colour accuracy {f['colour_accuracy']:.3f} "
            f"(judged {f['colour_judged_share']:.3f}; constant '{f['constant_guess']}' "
            f"{f['constant_accuracy']:.3f}) | cut off: real {f['cut_off_real']:.3f} "
            f"(judged {f['cut_off_real_judged_share']:.3f}), cropped {f['cut_off_cropped']:.3f} "
            f"(judged {f['cut_off_cropped_judged_share']:.3f}), gap {f['cut_off_gap']:.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True, help="folder of <id>.jpg photos")
    p.add_argument("--styles", type=Path, required=True, help="the catalogue's styles.csv")
    p.add_argument("--limit", type=int, default=None, help="a seeded random sample of this many")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default=None, help="resize every photo to WxH first, e.g. 60x80")
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x")) if args.size else None
    photos = load(args.images, args.styles, args.limit, args.seed, size)
    if not photos:
        print(f"no photo of {args.styles} in {args.images}", file=sys.stderr)
        return 2
    shapes = sorted({im.shape[:2] for *_, im in photos})
    t0 = time.perf_counter()
    records = judge(photos)
    seconds = time.perf_counter() - t0
    print(f"sample: {len(photos)} photos of {args.images} labelled by {args.styles}"
          f" (seed {args.seed}), sizes (h, w) {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
    # not benchmarks._machine.describe: it imports TensorFlow to list GPUs, and this is numpy only
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"{machine}; {1000 * seconds / (2 * len(photos)):.1f} ms per image analysed")
    print(report(figures(records), "all"))
    by = defaultdict(list)
    for r in records:
        by[r["category"]].append(r)
    for category, rs in sorted(by.items(), key=lambda kv: -len(kv[1])):
        print(report(figures(rs), str(category)[:14]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
