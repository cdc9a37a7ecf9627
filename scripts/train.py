#!/usr/bin/env python
"""Fine-tune Stable Diffusion v1.4 (KerasCV) with LoRA on a captions.csv (the same as ``fashion-sd train``: see :mod:`fashion_sd.commands.train`)."""

import sys

from fashion_sd.commands.train import *  # noqa: F401,F403 - tests load this file as the module
from fashion_sd.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
