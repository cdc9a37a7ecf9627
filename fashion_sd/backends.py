"""Which Keras backend runs which part, and the refusal a part gives on a backend it lacks.

The backend is Keras' own choice (``KERAS_BACKEND``, else ``~/.keras/keras.json``): set before
Keras loads, as Keras requires, so a config key could not choose it in time for the modules the
command imports first. TensorFlow stays the default where it is
installed; on a machine with JAX and no TensorFlow, JAX (``fashion_sd/__init__.py``).

On JAX: the networks (``sd/unet.py``, ``text_encoder.py``, ``vae.py``), the tokenizer, filling
the encoder caches, training (``training/step_jax.py``, the numpy batches, several devices
through Keras' ``DataParallel``) and generation (``sd/ddim.py``, ``serving/generate.py``).
TensorFlow only: evaluation (FID through TF-Hub's Inception), also during
training (``train.eval_every``), the text encoder's LoRA (``lora.text_encoder``: its JAX step
is not compared with TensorFlow's yet), and tf.distribute's ``multi_worker`` and ``tpu`` strategies;
each is refused before any model on another backend.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from fashion_sd.errors import BackendError

TENSORFLOW_ONLY = {
    "evaluate": "FID through TF-Hub's Inception",
}


def name() -> str:
    """The backend Keras runs (or will run) on, by Keras' own rule (``KERAS_BACKEND``, else
    ``keras.json``'s, else tensorflow), without importing Keras: checks that depend on it answer
    before TensorFlow or JAX loads. ``fashion_sd/__init__`` has already set ``KERAS_BACKEND``
    where it picks JAX."""
    if "keras" in sys.modules:
        return sys.modules["keras"].config.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")
    try:
        return json.loads((home / "keras.json").read_text()).get("backend", "tensorflow")
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def require_tensorflow(command: str) -> None:
    """Refuse ``command`` before any model when Keras runs on another backend, naming the one
    that has it. Imports Keras: call it once the flags are checked."""
    import keras  # the command's boundary: flags were checked without Keras

    backend = keras.config.backend()
    if backend != "tensorflow":
        raise BackendError(
            f"{command}: needs Keras' tensorflow backend ({TENSORFLOW_ONLY[command]}), and "
            f"KERAS_BACKEND is {backend}. Run it with KERAS_BACKEND=tensorflow in an environment "
            "that has TensorFlow (make setup: .venv); training and generation run on jax too "
            "(README: Backends)")
