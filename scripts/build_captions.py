#!/usr/bin/env python
"""Build captions.csv (id, image_path, caption, split + source columns) from Kaggle's styles.csv (the same as ``fashion-sd captions``: see :mod:`fashion_sd.commands.captions`)."""

import sys

from fashion_sd.commands.captions import *  # noqa: F401,F403 - tests load this file as the module
from fashion_sd.commands.captions import main

if __name__ == "__main__":
    sys.exit(main())
