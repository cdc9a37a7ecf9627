#!/usr/bin/env python
"""The fashion assistant: a web page where a designer picks garment attributes and gets images (the same as ``fashion-sd app``: see :mod:`fashion_sd.commands.app`)."""

import sys

from fashion_sd.commands.app import *  # noqa: F401,F403 - tests load this file as the module
from fashion_sd.commands.app import main

if __name__ == "__main__":
    sys.exit(main())
