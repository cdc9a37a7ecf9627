#!/usr/bin/env python
"""Run a study: every run of a sweep file (training, then FID/KID), one results table and plots (the same as ``fashion-sd sweep``: see :mod:`fashion_sd.commands.sweep`)."""

import sys

from fashion_sd.commands.sweep import *  # noqa: F401,F403 - tests load this file as the module
from fashion_sd.commands.sweep import main

if __name__ == "__main__":
    sys.exit(main())
