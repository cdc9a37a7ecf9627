"""Bridges to diffusers, AUTOMATIC1111 and ComfyUI (Stable Diffusion 1.x only).

  python scripts/convert.py import-model --from models/sd15 --out weights/sd15        # diffusers folder
  python scripts/convert.py import-model --from v1-5-pruned-emaonly.safetensors --out weights/sd15
  python scripts/convert.py import-lora --from my_style.safetensors --out my_style.lora.safetensors
  python scripts/convert.py export-lora --lora runs/demo/checkpoints/best.lora.safetensors \\
      --format kohya --out best_kohya.safetensors
  python scripts/convert.py merge --weights local:weights/sd15 --lora best.lora.safetensors \\
      --strength 0.8 --out weights/sd15-fashion

import-model writes KerasCV's four weight files (use them with --set model.weights=local:DIR);
import-lora writes a fashion-sd LoRA checkpoint (generate.py --lora, the app, lora.init_from);
export-lora writes kohya (A1111, ComfyUI) or diffusers (load_lora_weights) files, each with a
model card beside it (NAME.README.md: the Hub's README.md; from the run folder the LoRA sits in).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from fashion_sd import model_card, preflight
from fashion_sd.errors import reported
from fashion_sd.interop.lora_formats import export_lora, import_lora
from fashion_sd.sd import lora_file


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("import-model", help="an SD 1.x diffusers folder or single file -> KerasCV files")
    m.add_argument("--from", dest="source", required=True,
                   help="diffusers folder (unet/, vae/, text_encoder/) or CompVis .safetensors/.ckpt")
    m.add_argument("--out", required=True, help="folder for the KerasCV .weights.h5 files")
    m.add_argument("--ema", action="store_true", help="use the file's EMA U-Net weights")
    li = sub.add_parser("import-lora", help="a kohya or diffusers LoRA -> a fashion-sd LoRA checkpoint")
    li.add_argument("--from", dest="source", required=True, help="LoRA .safetensors (kohya or diffusers)")
    li.add_argument("--out", required=True, help="e.g. my_style.lora.safetensors")
    le = sub.add_parser("export-lora", help="a fashion-sd LoRA checkpoint -> kohya or diffusers")
    le.add_argument("--lora", required=True, help="a .lora.safetensors checkpoint")
    le.add_argument("--format", required=True, choices=("kohya", "diffusers"))
    le.add_argument("--out", required=True, help="output .safetensors file")
    mg = sub.add_parser("merge", help="base weights + LoRA folded into KerasCV files")
    mg.add_argument("--weights", required=True, help="pretrained or local:DIR (model.weights syntax)")
    mg.add_argument("--lora", required=True, help="a .lora.safetensors checkpoint")
    mg.add_argument("--strength", type=float, default=1.0, help="LoRA scale (default 1.0)")
    mg.add_argument("--out", required=True, help="folder for the merged KerasCV files")
    mg.add_argument("--cache-dir", default=None, help="download cache for --weights pretrained")
    return p.parse_args(argv)


def check_paths(args) -> None:
    """Inputs, numbers and outputs, before any model is built or any tensor read."""

    if args.command == "import-model":
        if not Path(args.source).exists():
            raise preflight.InputError(f"--from {args.source}: not found; give a diffusers "
                                       "folder or a .safetensors/.ckpt file")
        if not Path(args.source).is_dir():
            preflight.tensor_file("--from", args.source, "SD 1.x checkpoint")
    elif args.command == "import-lora":
        src = preflight.input_file("--from", args.source, "LoRA file")
        if src.suffix == ".safetensors":
            preflight.readable_safetensors("--from", src, "kohya or diffusers LoRA")
        else:
            preflight.tensor_file("--from", src, "LoRA file")
    else:  # our own checkpoint from its header; merged into SD 1.x, it must fit it
        lora_file.check(args.lora, "--lora", fits_model=args.command == "merge")
    if args.command == "merge":
        preflight.number("--strength", args.strength, low=-10, high=10,
                         hint=" (1 is the LoRA as trained)")
        if not (args.weights in ("pretrained", "random") or args.weights.startswith("local:")):
            raise preflight.InputError(f"--weights {args.weights}: use pretrained or local:DIR")
    out = Path(args.out)
    if args.command in ("import-model", "merge"):
        preflight.output_folder("--out", out)
    else:
        if out.is_dir():
            raise preflight.InputError(
                f"--out {out}: is a folder; give a file name such as "
                + ("x.lora.safetensors" if args.command == "import-lora" else "x.safetensors"))
        preflight.output_file("--out", out)
    if (args.command == "merge" and args.weights.startswith("local:")
            and Path(args.weights[len("local:"):]).resolve() == out.resolve()):
        raise preflight.InputError(f"--out {out}: the same folder as --weights; merged files "
                                   "would replace the base model. Give another folder")
    source = {"import-lora": "source", "export-lora": "lora"}.get(args.command)
    if source and Path(getattr(args, source)).resolve() == out.resolve():
        flag = "--from" if source == "source" else "--lora"
        raise preflight.InputError(f"--out {out}: the same file as {flag}; the converted LoRA "
                                   "would replace the one it is made from. Give another name")


@reported(OSError, ValueError)
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_paths(args)  # before any model is built or any tensor read (and before Keras loads)
    if args.command == "import-model":
        from fashion_sd.interop.weights import import_model

        s = import_model(args.source, args.out, ema=args.ema)
        print(f"wrote {', '.join(s['components'].values())} to {args.out}")
        if s["absent"]:
            print(f"absent from the source (not written): {', '.join(s['absent'])}; copy those "
                  "files from another SD 1.x folder before using local:" + args.out)
        for why, n in s["skipped"].items():
            print(f"skipped {n} tensors: {why}")
        print(f"use it with: --set model.weights=local:{args.out}")
    elif args.command == "import-lora":

        meta = import_lora(args.source, args.out)
        layers = json.loads(meta["layers"])
        te = sum(1 for x in layers if x.startswith("te"))
        print(f"{meta['imported_format']} LoRA, rank {meta['rank']}, alpha {meta['alpha']}: "
              f"{len(layers) - te} U-Net and {te} text-encoder layers -> {args.out}")
    elif args.command == "export-lora":

        export_lora(args.lora, args.format, args.out)
        print(f"wrote {args.format} LoRA {args.out}")
        card = model_card.write_export_card(args.lora, args.format, args.out)
        print(f"wrote its model card {card} (upload it to the Hub as README.md)")
    else:
        from fashion_sd.interop.weights import merge_model

        merge_model(args.weights, args.lora, args.out, args.strength, cache_dir=args.cache_dir)
        print(f"wrote merged weights to {args.out}; use --set model.weights=local:{args.out}")
    return 0
