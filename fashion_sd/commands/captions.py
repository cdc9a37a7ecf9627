"""Build captions.csv (id, image_path, caption, split + source columns) from Kaggle's styles.csv.

  python scripts/build_captions.py --config configs/demo.yaml
  python scripts/build_captions.py --styles PATH/styles.csv --images PATH/images --out captions.csv
  python scripts/build_captions.py --kaggle paramaggarwal/fashion-product-images-small --out ...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fashion_sd import preflight
from fashion_sd.catalogue import captions, kaggle
from fashion_sd.config import add_config_arguments, config_from_args
from fashion_sd.errors import reported
from fashion_sd.images import size_label, upscale_factors, upscale_warning


@reported(FileNotFoundError)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--styles", help="styles.csv (default: data.styles)")
    parser.add_argument("--images", help="image folder, every image is checked (default: data.images)")
    parser.add_argument("--kaggle", metavar="HANDLE",
                        help="download with kagglehub, e.g. paramaggarwal/fashion-product-images-small")
    parser.add_argument("--out", help="captions CSV to write (default: data.captions)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the summary and ten sample captions; write nothing")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    out = Path(args.out or cfg.data.captions)
    # Everything checkable before a download or the first image (minutes on the catalogue).
    if not args.dry_run:
        for path in (out, out.parent / "rejected.csv", out.parent / "flagged.csv"):
            preflight.output_file("--out", path)
    styles, images = args.styles or cfg.data.styles, args.images or cfg.data.images
    if args.kaggle:
        styles, images = kaggle.download(args.kaggle)
    if args.styles and not args.images and not args.kaggle:
        images = None  # a file given alone is captioned without touching any image
    preflight.text_file("--styles", styles, "styles.csv")
    if images is not None:
        preflight.input_folder("--images", images, "image folder")
    result = captions.build_captions(styles, cfg.captions, cfg.seed, images,
                                     progress=_progress)
    print(captions.format_summary(result.summary, cfg.captions.max_tokens))
    if images is None:
        print("images: not checked (no --images); image_path is left empty")
    else:

        factors = upscale_factors([str(p) for p in result.table.image_path], cfg.data.resolution)
        if len(factors):
            print(f"source images vs data.resolution {size_label(cfg.data.resolution)}: median "
                  f"enlargement {np.median(factors):.1f}x ({len(factors)} sampled)")
        if warning := upscale_warning(factors, cfg.data.resolution):
            print(f"WARNING: {warning}")
    if args.dry_run:
        print("\nsample captions:")
        print("\n".join(f"  {c}" for c in result.sample_captions(10, cfg.seed)))
        print("\n--dry-run: nothing written")
        return 0
    out, rejected = captions.write_outputs(result, out)
    cfg.data.styles, cfg.data.images, cfg.data.captions = str(styles), images and str(images), str(out)
    config_path = cfg.save(out.with_name(out.stem + ".config.yaml"))
    print(f"wrote {out} ({len(result.table)} rows), {rejected}, {out.parent / 'flagged.csv'}, "
          f"{config_path}")
    return 0


def _progress(iterable, total):

    return tqdm(iterable, total=total, desc="checking images", unit="img", file=sys.stderr)

