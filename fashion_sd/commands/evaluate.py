"""FID and KID of the base model and each LoRA checkpoint against a split's real images.

  python scripts/evaluate_fid.py --config configs/demo.yaml --checkpoints runs/demo/checkpoints --include-base
  python scripts/evaluate_fid.py --config C --checkpoints 'runs/x/checkpoints/epoch_*.lora.safetensors'

Writes fid.csv, fid.md, fid.png and real_vs_generated.png to OUTPUT.DIR/eval (or --out), and the
generated images under images/. Checkpoints already scored with the same settings are skipped.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fashion_sd import preflight
from fashion_sd.config import ConfigError, add_config_arguments, config_from_args
from fashion_sd.errors import FashionSDError
from fashion_sd.rundir import SCORES_MD, RunDir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--checkpoints", help="a run's checkpoints/ folder, a file or a glob")
    parser.add_argument("--include-base", action="store_true", help="score the base model too")
    parser.add_argument("--num-images", type=int, help="generated images per model (eval.num_images)")
    parser.add_argument("--split", choices=["train", "val", "test"], help="default: eval.split")
    parser.add_argument("--out", help="output folder (default: OUTPUT.DIR/eval)")
    parser.add_argument("--force", action="store_true", help="recompute scored checkpoints")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args)
        if args.num_images is not None and args.num_images < 2:
            raise ConfigError("--num-images must be >= 2 (a covariance needs two images)")
        # Every checkpoint is checked against SD 1.x before the first one is scored.
        from fashion_sd.evaluate import find_checkpoints, make_plan

        for path in find_checkpoints(args.checkpoints) if args.checkpoints else []:
            preflight.lora_file("--checkpoints", path)
        preflight.output_folder("--out" if args.out else "output.dir",
                                args.out or RunDir(cfg.output.dir).eval)
        make_plan(cfg, args.split or cfg.eval.split, args.num_images)
    except FashionSDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from fashion_sd.evaluate import evaluate
    from fashion_sd.progress import tqdm_progress

    try:
        table = evaluate(cfg, args.checkpoints, args.include_base, args.num_images, args.split,
                         args.force, progress=tqdm_progress, out=args.out)
    except FashionSDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else RunDir(cfg.output.dir).eval
    summary = out / SCORES_MD
    print(summary.read_text() if summary.is_file() else table.to_string())
    return 0

