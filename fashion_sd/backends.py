"""Which Keras backend runs which part, and the refusal a part gives on a backend it lacks.

The backend is Keras' own choice (``KERAS_BACKEND``, else ``~/.keras/keras.json``): set before
Keras loads, as Keras requires, so a config key could not choose it in time for the modules the
command imports first. TensorFlow stays the default where it is
installed; on a machine with JAX and no TensorFlow, JAX (``fashion_sd/__init__.py``).

On JAX: the networks (``sd/unet.py``, ``text_encoder.py``, ``vae.py``), the tokenizer, filling
the encoder caches, training (``training/step_jax.py``, the numpy batches, several devices
through Keras' ``DataParallel``) and generation (``sd/ddim.py``, ``serving/generate.py``).
TensorFlow only: evaluation (FID through TF-Hub's Inception, KerasCV's CLIP), also during
training (``train.eval_every``), the text encoder's LoRA (``lora.text_encoder``: its JAX step
is not compared with TensorFlow's yet), and tf.distribute's ``multi_worker`` and ``tpu`` strategies;
each is refused before any model on another backend.
"""

from __future__ import annotations

from fashion_sd.errors import BackendError

TENSORFLOW_ONLY = {
    "evaluate": "FID through TF-Hub's Inception and KerasCV's CLIP",
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
            "that has TensorFlow (make setup: .venv); training and generation run on jax too "
            "(README: Backends)")
