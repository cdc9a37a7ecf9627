"""``python -m fashion_sd COMMAND [ARGS]``, the same as the ``fashion-sd`` console command."""

import sys

from fashion_sd.cli import main

sys.exit(main())
