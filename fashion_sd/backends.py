"""Which Keras backend runs which part, and the refusal a part gives on a backend it lacks.

The backend is Keras' own choice (``KERAS_BACKEND``, else ``~/.keras/keras.json``): set before
Keras loads, as Keras requires, so a config key could not choose it in time for the modules the
command imports first. TensorFlow stays the default.

On JAX today: the networks (``sd/unet.py``, ``text_encoder.py``, ``vae.py``), the tokenizer, the
training step (``training/step_jax.py``) and generation (``sd/ddim.py``, ``serving/generate.py``).
TensorFlow only, for now: the training command (its data pipeline is tf.data and its encoder
caches are written through it), evaluation (FID through TF-Hub's Inception, KerasCV's CLIP),
sweeps and multi-worker training (tf.distribute).
"""

from __future__ import annotations

from fashion_sd.errors import BackendError

TENSORFLOW_ONLY = {
    "train": "its data pipeline (tf.data over the encoder caches)",
}


def require_tensorflow(command: str) -> None:
    """Refuse ``command`` before any model when Keras runs on another backend, naming the one
    that has it. Imports Keras: call it once the flags are checked."""
    import keras  # the command's boundary: flags were checked without Keras

    backend = keras.config.backend()
    if backend != "tensorflow":
        raise BackendError(
            f"{command}: needs Keras' tensorflow backend ({TENSORFLOW_ONLY[command]}), and "
            f"KERAS_BACKEND is {backend}. Run it with KERAS_BACKEND=tensorflow in an environment "
            "that has TensorFlow (make setup: .venv); on jax, generation and the training step "
            "run today (README: Backends)")
