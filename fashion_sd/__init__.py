"""fashion-sd: LoRA fine-tuning of KerasCV Stable Diffusion on a fashion catalogue, scored by FID."""

import importlib.util
import json
import os
import sys
from pathlib import Path

__version__ = "0.1.0"


def _default_backend() -> str | None:
    """The Keras backend for a machine whose user chose none: Keras' own default (TensorFlow)
    where TensorFlow is installed, JAX on a machine that has JAX and no TensorFlow (a GPU box set
    up for JAX), where Keras' default would fail on import. An explicit ``KERAS_BACKEND`` or a
    ``backend`` in Keras' ``keras.json`` always wins. Must run before Keras loads."""
    if os.environ.get("KERAS_BACKEND"):
        return None
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    try:
        if "backend" in json.loads((home / "keras.json").read_text()):
            return None
    except (OSError, ValueError):
        pass
    if importlib.util.find_spec("tensorflow") is None and importlib.util.find_spec("jax"):
        return "jax"
    return None


if "keras" not in sys.modules and (_backend := _default_backend()):
    os.environ["KERAS_BACKEND"] = _backend
