"""Keras' global dtype policy for a stretch of code: Keras has the global policy but no scope."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def dtype_policy(name: str):
    """Layers built inside take ``name`` (``float32``, ``mixed_bfloat16``...); the caller's
    policy is back afterwards, also after an error."""
    import keras

    policy = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(policy)
