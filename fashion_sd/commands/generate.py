"""Generate garments from prompts with Stable Diffusion and an optional LoRA checkpoint.

  python scripts/generate.py --config configs/demo.yaml --lora runs/demo/checkpoints/last.lora.safetensors \
      --prompt "an image of a 2011 Casual Fall White Men's Sweater" --num-images 4 --seed 0 --out out/
  python scripts/generate.py --config C --year 2011 --usage Casual --season Fall --colour White \
      --gender Men --article Sweaters --out out/
  python scripts/generate.py --config C --prompts-file prompts.txt --steps 50 --out out/

Writes p{prompt}_s{seed}.png for each prompt and seed, contact_sheet.png and generate.json.
"""

from __future__ import annotations

import argparse
import logging

from fashion_sd import preflight
from fashion_sd.catalogue.caption_text import caption_from_attributes
from fashion_sd.caption_template import CaptionError
from fashion_sd.config import ConfigError, add_config_arguments, config_from_args
from fashion_sd.errors import reported
from fashion_sd.images import valid_size
from fashion_sd.progress import tqdm_progress
from fashion_sd.sd import lora_file
from fashion_sd.serving.image_settings import ImageSettings

ATTRIBUTES = ("year", "usage", "season", "colour", "gender", "article")


def prompts_from_args(args, template: str) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = preflight.text_file("--prompts-file", args.prompts_file, "prompts file")
        prompts += [line.strip() for line in path.read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    attrs = {k: getattr(args, k) for k in ATTRIBUTES if getattr(args, k) is not None}
    if attrs:
        prompts.append(caption_from_attributes(template, **attrs))
    if not prompts:
        raise CaptionError("no prompt: give --prompt TEXT, --prompts-file FILE or garment "
                           "attributes such as --article Tshirts")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise CaptionError(f"prompt {empty[0]} is empty")
    return prompts


def parse_resolution(text):
    """``256`` (a square) or ``384x512`` (width x height), as data.resolution takes them."""
    if text is None or isinstance(text, (int, list)):
        return text
    try:
        sides = [int(x) for x in str(text).lower().split("x")]
    except ValueError:
        raise ConfigError(f"--resolution {text}: give pixels, e.g. 256 or 384x512") from None
    if len(sides) > 2:
        raise ConfigError(f"--resolution {text}: give pixels, e.g. 256 or 384x512")
    return sides[0] if len(sides) == 1 else sides


def check_numbers(args, resolution) -> None:
    """Every number on the command line (or from --from-png) in range and finite: a NaN guidance
    would otherwise make black images and exit 0."""
    if not valid_size(resolution):
        raise ConfigError(f"--resolution {args.resolution or resolution}: must be a positive "
                          "multiple of 64, or WIDTHxHEIGHT of two")
    preflight.number("--num-images", args.num_images, low=1, integer=True)
    preflight.number("--steps", args.steps, low=1, high=1000, integer=True,
                     hint=" (DDIM steps; 50 is the usual)")
    preflight.number("--batch-size", args.batch_size, low=1, integer=True)
    preflight.number("--seed", args.seed, low=0, high=2**32 - 1, integer=True,
                     hint=" (NumPy and TensorFlow take 32-bit seeds)")
    if getattr(args, "batch_seeds", None):  # from --from-png: the seeds of the image's batch
        for seed in args.batch_seeds:
            preflight.number("--from-png seed", seed, low=0, high=2**32 - 1, integer=True)
    elif args.seed + args.num_images - 1 > 2**32 - 1:
        # the images' seeds are SEED, SEED+1, ...: the last one must be a seed too, or its PNG
        # records one that --from-png refuses
        raise ConfigError(f"--seed {args.seed} with --num-images {args.num_images}: the last "
                          f"image's seed {args.seed + args.num_images - 1} is past 2^32 - 1; "
                          f"give --seed {2**32 - args.num_images} or less")
    preflight.number("--guidance", args.guidance, low=0, high=100,
                     hint=" (classifier-free guidance; 7.5 is the usual)")
    preflight.number("--lora-strength", args.lora_strength, low=-10, high=10,
                     hint=" (1 is the LoRA as trained, 0 the base model)")


def apply_png_settings(args, cfg) -> None:
    """Take prompt, seed, steps, guidance, resolution, weights and LoRA from a generated PNG."""

    preflight.input_file("--from-png", args.from_png, "PNG")
    try:
        s = ImageSettings.read_png(args.from_png).to_dict()
    except (ValueError, OSError) as exc:  # OSError: not an image at all
        raise ConfigError(f"--from-png {args.from_png}: not a PNG written by this tool ({exc})") from None
    args.prompt, args.prompts_file = [s["prompt"]], None
    for name in ATTRIBUTES:
        setattr(args, name, None)
    # The image's whole batch is regenerated (float rounding depends on it); only it is kept.
    args.batch_seeds = s.get("batch_seeds") or [s["seed"]]
    args.keep = [s["seed"]]
    args.steps, args.guidance = s["steps"], s["guidance"]
    args.batch_size = len(args.batch_seeds)
    args.negative_prompt, args.resolution = s.get("negative_prompt"), s.get("resolution")
    # a stored strength of 0 (the base model through the LoRA's file) is kept, not taken as unset
    args.lora = s.get("lora")
    args.lora_strength = 1.0 if s.get("lora_strength") is None else s["lora_strength"]
    # PNGs from before the noise was recorded started from keras.random.normal
    args.noise = s.get("noise") or "keras"
    args.rounding = s.get("rounding") or "truncate"  # and truncated their pixels, as KerasCV
    if s.get("weights"):
        cfg.model.weights = s["weights"]
    if s.get("model_seed") is not None:  # the seed that random-init weights were drawn with
        cfg.seed = int(s["model_seed"])


@reported()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--lora", help="a .lora.safetensors checkpoint (rank, targets from its metadata)")
    parser.add_argument("--lora-strength", type=float, default=1.0)
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="one prompt per line (# comments)")
    for name in ATTRIBUTES:
        parser.add_argument(f"--{name}", help=f"garment attribute: {name}")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0, help="seeds are SEED, SEED+1, ...")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--resolution", help="pixels: 256, or WIDTHxHEIGHT such as 384x512 "
                                             "(default: data.resolution)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--from-png", metavar="FILE",
                        help="reproduce an image written by this script: its prompt, seed, steps, "
                             "guidance, resolution, weights and LoRA come from the PNG's metadata")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    if args.from_png:
        apply_png_settings(args, cfg)
    prompts = prompts_from_args(args, cfg.captions.template)
    resolution = parse_resolution(args.resolution) or cfg.data.resolution
    check_numbers(args, resolution)
    if args.lora:
        lora_file.check(args.lora, "--lora")
    preflight.output_folder("--out", args.out)
    from fashion_sd.serving.generate import Job, generate_to_folder, load_sampler

    sampler, record = load_sampler(cfg.model, resolution, cfg.seed, args.lora, args.lora_strength,
                                   getattr(args, "noise", "philox"),
                                   getattr(args, "rounding", "round"))
    seeds = getattr(args, "batch_seeds", None) or list(range(args.seed, args.seed + args.num_images))
    job = Job(prompts, seeds, args.steps, args.guidance, args.negative_prompt, args.batch_size,
              keep=getattr(args, "keep", None))
    sidecar = generate_to_folder(sampler, job, args.out, record, tqdm_progress)
    print(f"{len(sidecar['images'])} images for {len(prompts)} prompt(s) -> {args.out} "
          f"({record['label']})")
    return 0

