"""FID and KID of the base model and each LoRA checkpoint against a split's real images.

  python scripts/evaluate_fid.py --config configs/demo.yaml --checkpoints runs/demo/checkpoints --include-base
  python scripts/evaluate_fid.py --config C --checkpoints 'runs/x/checkpoints/epoch_*.lora.safetensors'

Writes fid.csv (FID, KID, CLIP score, garment type top-1/top-3, on-model, colour and cut-off rates
per model; the eval.select column marks the best), fid.md (a one-screen summary), fid.png and
real_vs_generated.png to OUTPUT.DIR/eval (or --out), and the generated images with their
per-image scores.csv under images/. Checkpoints already scored with the same settings are skipped.

Any folder of images with a captions CSV (a catalogue, a folder of generated images):
  python scripts/evaluate_fid.py --images DIR --captions CSV --out DIR
writes garment.csv (one row per image: colour judged against its baseColour, cut off or not, and
with CLIP weights (eval.clip) its CLIP score against the caption, its zero-shot garment type and
whether it is worn) and garment.md (the summary); no Stable Diffusion model is loaded.

Folders of generated images (from this project, diffusers or anything else) against a folder of
real ones, as clean-fid's compute_fid(dir1, dir2):
  python scripts/evaluate_fid.py --images GEN_DIR [GEN_DIR ...] --real REAL_DIR --out DIR
writes distances.csv and distances.md: FID, KID, CMMD, FD-DINOv2, precision/recall/density/
coverage and the standard errors, one row per folder; no Stable Diffusion model is loaded.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fashion_sd import preflight
from fashion_sd.backends import require_tensorflow
from fashion_sd.config import ConfigError, add_config_arguments, config_from_args
from fashion_sd.errors import reported
from fashion_sd.clip_spec import check_dinov2_spec, check_spec
from fashion_sd.evaluation.evaluate import (
    Parts,
    Scope,
    attribute,
    evaluate,
    find_checkpoints,
    garment_types,
    make_plan,
)
from fashion_sd.evaluation.judge import load_judge, summarise
from fashion_sd.images import header_problem
from fashion_sd.progress import tqdm_progress
from fashion_sd.rundir import DISTANCES_MD, SCORES_MD, EvalDir, RunDir
from fashion_sd.sd import lora_file


def compare(args) -> int:
    """Each ``--images`` folder against the ``--real`` one (evaluation/folders.py)."""
    if args.captions or not args.out or not args.images:
        raise preflight.InputError("--real compares folders: --images DIR [DIR ...] --real DIR "
                                   "--out DIR (no --captions: that judges garments)")
    cfg = config_from_args(args)
    check_spec(cfg.eval.clip)
    check_dinov2_spec(cfg.eval.dinov2)
    real = preflight.input_folder("--real", args.real, "image folder")
    generated = [preflight.input_folder("--images", f, "image folder") for f in args.images]
    out = preflight.output_folder("--out", args.out)
    from fashion_sd.evaluation import folders  # noqa: PLC0415 - the heavy part, after the checks

    for folder in [real, *generated]:  # headers only, before any network loads
        folders.image_files(folder, "--real" if folder == real else "--images")
    require_tensorflow("evaluate")
    folders.compare_folders(cfg, generated, real, out, folders.load_networks(cfg), tqdm_progress)
    print((out / DISTANCES_MD).read_text())
    return 0


def judge_folder(args) -> int:
    """The garment metrics of a folder of images, one row per captions row: colour and cut-off
    always, CLIP score, garment type, colour, gender and on-model when ``eval.clip`` gives a
    CLIP model. Loads no Stable Diffusion model."""

    cfg, folder, table, out = _folder_inputs(args)
    rows, paths, missing = _match_images(folder, table)

    types, vocabulary = garment_types(table, rows)
    colours, colour_names = attribute(table, rows, "baseColour")
    genders, _ = attribute(table, rows, "gender")
    judge, clip_note = load_judge(cfg, vocabulary, colour_names)
    prompts = rows.caption.tolist() if "caption" in rows else [""] * len(rows)
    if judge.clip is not None and "caption" not in rows:
        judge.clip, clip_note = None, f"--captions {args.captions} has no caption column"
    scored = _judge_in_chunks(judge, paths, prompts, types, colours, genders)
    text = _folder_summary(folder, summarise(scored), judge, clip_note, missing)
    EvalDir(out).write_garment(scored, text)
    print(text)
    return 0


def _folder_inputs(args):
    """(config, image folder, captions table, output folder), every check before any image."""

    if not (args.images and args.captions and args.out) or len(args.images) != 1:
        raise preflight.InputError("--images, --captions and --out go together: "
                                   "--images DIR --captions CSV --out DIR (one folder; several "
                                   "folders are compared with --real DIR)")
    cfg = config_from_args(args)
    check_spec(cfg.eval.clip)
    folder = preflight.input_folder("--images", args.images[0], "image folder")
    table = pd.read_csv(preflight.text_file("--captions", args.captions, "captions CSV"),
                        dtype=str, keep_default_na=False)
    if "image_path" not in table.columns and "id" not in table.columns:
        raise preflight.InputError(f"--captions {args.captions}: needs an image_path or an id "
                                   "column to find each image in --images")
    return cfg, folder, table, preflight.output_folder("--out", args.out)


def _match_images(folder: Path, table):
    """The captions rows that have an image in ``folder`` (by file name, or by stem for an id
    column), their paths, and how many rows had none; every image's header checked."""

    files = {}
    for p in folder.iterdir():
        if p.is_file() or p.is_symlink():  # a broken link or a loop is named below
            files[p.name] = p
            files.setdefault(p.stem, p)
    keys = (table.image_path.map(lambda s: Path(s).name) if "image_path" in table.columns
            else table.id)
    found = [files.get(k) or files.get(Path(k).stem) for k in keys]
    rows = table[[f is not None for f in found]].reset_index(drop=True)
    paths = [f for f in found if f is not None]
    if not paths:  # a table of NaNs, with no cause given, otherwise
        raise preflight.InputError(
            f"--images {folder}: none of its {len(set(files.values()))} file(s) matches a row "
            "of the captions; name them as the captions' image_path files, or by their id")
    bad = [(p, r) for p in paths if (r := header_problem(p))]  # headers only: no pixel decoded
    if bad:
        raise preflight.InputError(f"--images {folder}: {len(bad)} image(s) cannot be judged, e.g. "
                                   + "; ".join(f"{p.name}: {r}" for p, r in bad[:3]))
    return rows, paths, sum(f is None for f in found)


def _judge_in_chunks(judge, paths, prompts, types, colours, genders, chunk: int = 64):
    """One row per image; a catalogue's photos are up to 1800x2400, so they are decoded a
    chunk at a time, never all at once."""

    parts = [judge([_rgb(p) for p in paths[s: s + chunk]], prompts[s: s + chunk],
                   types[s: s + chunk], colours[s: s + chunk], genders[s: s + chunk])
             for s in range(0, len(paths), chunk)]
    scored = pd.concat(parts or [judge([], [], [], [])], ignore_index=True)
    scored.insert(0, "image", [str(p) for p in paths])
    return scored


def _folder_summary(folder, summary: dict, judge, clip_note: str, missing: int) -> str:
    clip = (f"| {summary['clip_score']:.1f} | {summary['type_top1']:.3f} / "
            f"{summary['type_top3']:.3f} | {summary['colour_top1']:.3f} | "
            f"{summary['gender_top1']:.3f} | {summary['on_model_rate']:.3f} "
            if judge.clip is not None else "| | | | | ")
    return (f"# Garment metrics: {folder}\n\n| images | colour accuracy (scored, share judged) "
            f"| cut-off rate | CLIP score | type top-1 / top-3 | colour top-1 (CLIP) | gender "
            f"top-1 (CLIP) | on-model |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
            f"| {summary['images']} | {summary['colour_accuracy']:.3f} ({summary['colour_scored']}, "
            f"{summary['colour_judged_share']:.0%} judged) | {summary['cut_off_rate']:.3f} "
            f"({summary['cut_off_judged_share']:.0%} judged; bounds {summary['cut_off_low']:.3f}-"
            f"{summary['cut_off_high']:.3f}) {clip}|\n"
            + (f"\nCLIP: {judge.clip.label}.\n" if judge.clip is not None else
               f"\nCLIP metrics off: {clip_note}\n")
            + (f"\n{missing} captions row(s) had no image in the folder.\n" if missing else ""))


def _rgb(path):

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@reported()
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
    parser.add_argument("--images", nargs="+", metavar="DIR",
                        help="a folder of images to judge (with --captions, --out), or folders "
                             "to compare with --real (with --out)")
    parser.add_argument("--real", metavar="DIR", help="with --images: the folder of real images "
                                                      "every distance is measured to")
    parser.add_argument("--captions", help="with --images: a CSV with image_path (or id) and "
                                           "baseColour columns")
    args = parser.parse_args(argv)
    if args.real:
        return compare(args)
    if args.images or args.captions:
        return judge_folder(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    if args.num_images is not None and args.num_images < 2:
        raise ConfigError("--num-images must be >= 2 (a covariance needs two images)")
    # Every checkpoint is checked against SD 1.x before the first one is scored.

    for path in find_checkpoints(args.checkpoints) if args.checkpoints else []:
        lora_file.check(path, "--checkpoints")
    preflight.output_folder("--out" if args.out else "output.dir",
                            args.out or RunDir(cfg.output.dir).eval)
    require_tensorflow("evaluate")
    make_plan(cfg, args.split or cfg.eval.split, args.num_images)
    check_spec(cfg.eval.clip)
    check_dinov2_spec(cfg.eval.dinov2)
    table = evaluate(cfg, args.checkpoints, args.include_base, args.force,
                     Scope(args.split, args.num_images, args.out), Parts(progress=tqdm_progress))
    out = Path(args.out) if args.out else RunDir(cfg.output.dir).eval
    summary = out / SCORES_MD
    print(summary.read_text() if summary.is_file() else table.to_string())
    return 0
