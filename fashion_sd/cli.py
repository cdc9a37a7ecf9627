"""``fashion-sd COMMAND [ARGS]``: one entry point for every command (also ``python -m fashion_sd``).

Each command is a module of :mod:`fashion_sd.commands` with a ``main(argv) -> int``; the scripts
in ``scripts/`` call the same functions, so both spellings behave identically.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, what it does)
COMMANDS = {
    "captions": ("captions", "styles.csv -> captions.csv with a seeded train/val/test split"),
    "train": ("train", "fine-tune LoRA on a captions.csv (checkpoints, logs, samples)"),
    "workers": ("workers", "N multi-worker training processes on this machine (loopback)"),
    "generate": ("generate", "prompts -> PNGs with the base model or a LoRA"),
    "evaluate": ("evaluate", "FID/KID of the base model and of checkpoints"),
    "sweep": ("sweep", "a grid or KerasTuner search of runs, one results table"),
    "convert": ("convert", "SD 1.x models and LoRAs in from / out to diffusers and A1111"),
    "app": ("app", "the designers' web app"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return ("usage: fashion-sd COMMAND [ARGS]   (fashion-sd COMMAND --help for its options)\n\n"
            "commands:\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"fashion_sd.commands.{COMMANDS[name][0]}")
    return module.main(rest)
