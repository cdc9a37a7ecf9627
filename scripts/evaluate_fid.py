#!/usr/bin/env python
"""FID and KID of the base model and each LoRA checkpoint against a split's real images (the same as ``fashion-sd evaluate``: see :mod:`fashion_sd.commands.evaluate`)."""

import sys

from fashion_sd.commands.evaluate import *  # noqa: F401,F403 - tests load this file as the module
from fashion_sd.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
