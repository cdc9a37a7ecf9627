"""The command-line front ends, one module per command; ``fashion-sd COMMAND`` and
``python scripts/COMMAND.py`` both call their ``main``."""
