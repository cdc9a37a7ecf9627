"""The one base class of every "bad input" error the package raises.

Each error says which file, row, key or flag is wrong and how to fix it; a command catches
:class:`FashionSDError` once and prints the message instead of a traceback. The concrete classes
also derive from ``ValueError`` or ``RuntimeError``, as they always did, so existing ``except``
clauses keep working.
"""


class FashionSDError(Exception):
    """Input or state a command cannot use; the message says what to do."""
