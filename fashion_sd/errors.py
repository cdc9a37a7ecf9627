"""The one base class of every "bad input" error the package raises, and the one place a command
turns it into a message and an exit code.

Each error says which file, row, key or flag is wrong and how to fix it; every command's
``main`` is wrapped by :func:`reported`, which prints the message instead of a traceback. The
concrete classes also derive from ``ValueError`` or ``RuntimeError``, as they always did, so
existing ``except`` clauses keep working.
"""

from __future__ import annotations

import functools
import sys


class FashionSDError(Exception):
    """Input or state a command cannot use; the message says what to do."""

    exit_code = 2  # bad input; a run that started and had to stop says 1
    prefix = "error: "


def reported(*also: type[BaseException]):
    """Decorate a command's ``main(argv) -> int``: a :class:`FashionSDError` (and the ``also``
    exception types) becomes its message on stderr and its exit code, instead of a traceback."""
    caught = (FashionSDError, *also)

    def wrap(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except caught as exc:
                print(f"{getattr(exc, 'prefix', 'error: ')}{exc}", file=sys.stderr)
                return getattr(exc, "exit_code", 2)
        return run
    return wrap


class BackendError(FashionSDError, RuntimeError):
    """A part asked of a Keras backend that does not have it; the message names one that does."""
