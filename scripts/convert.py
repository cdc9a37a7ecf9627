#!/usr/bin/env python
"""Bridges to diffusers, AUTOMATIC1111 and ComfyUI (Stable Diffusion 1.x only) (the same as ``fashion-sd convert``: see :mod:`fashion_sd.commands.convert`)."""

import sys

from fashion_sd.commands.convert import *  # noqa: F401,F403 - tests load this file as the module
from fashion_sd.commands.convert import main

if __name__ == "__main__":
    sys.exit(main())
