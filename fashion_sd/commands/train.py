"""Fine-tune Stable Diffusion v1.4 (KerasCV) with LoRA on a captions.csv.

  python scripts/train.py --config configs/demo.yaml
  python scripts/train.py --config configs/paper_best.yaml --set train.epochs=30
  python scripts/train.py --config configs/paper_best.yaml --resume
"""

from __future__ import annotations

import argparse
import logging

from fashion_sd import preflight
from fashion_sd.config import add_config_arguments, config_from_args
from fashion_sd.errors import reported
from fashion_sd.sd import lora_file


@reported()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in output.dir from its last train state")
    mode.add_argument("--fresh", action="store_true",
                      help="start over: delete the checkpoints, samples and logs of an earlier "
                           "run in output.dir first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    preflight.output_folder("output.dir", cfg.output.dir)
    if args.resume:  # the run's own config.yaml, which --resume compares with
        preflight.resume_config(cfg.output.dir)
    if cfg.lora.init_from and not args.resume:  # its shapes against SD 1.x, from the header
        lora_file.check(cfg.lora.init_from, "lora.init_from", unet_only=True)
    # TensorFlow loads only once the config is known to be good. A run that stops exits 1
    # (TrainingStopped), one stopped by a signal 128 + the signal (TrainingInterrupted).
    from fashion_sd.training.inputs import early_checks

    inputs = early_checks(cfg, args.resume, args.fresh)  # before Keras: answers in ~1 s
    from fashion_sd.training.run import summary_line, train

    summary = train(cfg, resume=args.resume, fresh=args.fresh, inputs=inputs)
    if "status" in summary and "step" in summary:
        print(summary_line(summary, cfg.output.dir))
    return 0

