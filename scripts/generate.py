#!/usr/bin/env python
"""Generate garments from prompts with Stable Diffusion and an optional LoRA checkpoint (the same as ``fashion-sd generate``: see :mod:`fashion_sd.commands.generate`)."""

import sys

from fashion_sd.commands.generate import *  # noqa: F401,F403 - tests load this file as the module
from fashion_sd.commands.generate import main

if __name__ == "__main__":
    sys.exit(main())
