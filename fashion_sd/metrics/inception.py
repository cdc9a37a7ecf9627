"""Inception-v3 pool features (2048 per image) for FID and KID, from one of three networks.

Backends (:func:`load_extractor`):

- ``tfhub``: TF-GAN's FID Inception, https://tfhub.dev/tensorflow/tfgan/eval/inception/1, the
  2015 TensorFlow graph that the original FID code (TTUR) and pytorch-fid's weights come from;
  its ``pool_3`` output. The numbers to compare with the literature.
- ``keras``: ``keras.applications.InceptionV3`` with ImageNet weights, global average pool.
  A close relative, not the same weights: its FIDs compare with each other only.
- ``untrained``: the same Keras network, randomly initialised, for tests and the offline demo;
  ``comparable`` is False and its numbers mean nothing outside one run.

Preprocessing, the same for every backend (id :data:`PREPROCESSING`):

1. Input: uint8 RGB, (H, W, 3), any size. Generated images are already uint8 (what a PNG of
   them stores), real ones are decoded and padded to a square on their own background at their
   own size (:func:`load_real_image`), so they are framed as training framed them.
2. float32, then a 299x299 bilinear resize with antialiasing from the image's own size
   (``tf.image.resize(..., "bilinear", antialias=True)``): without the antialiasing filter a
   large catalogue photo would be point-sampled and alias (Parmar et al. 2022, clean-fid).
3. x / 127.5 - 1, into [-1, 1], the input range of both networks.

TF-GAN's own ``preprocess_image`` resizes without antialiasing and maps with (x - 128) / 128;
numbers from this module are therefore comparable with each other, and close to, not equal
to, TF-GAN's.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

from fashion_sd.errors import FashionSDError

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
TFHUB_HANDLE = "https://tfhub.dev/tensorflow/tfgan/eval/inception/1"
KERAS_WEIGHTS_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
                     "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5")
# Changes whenever the steps in the module docstring change; it is part of every stats cache key.
PREPROCESSING = "uint8-rgb/bilinear-antialias-299/x127.5-1"


class InceptionUnavailable(FashionSDError, RuntimeError):
    """The requested Inception weights cannot be loaded (offline and not cached, or a bad path)."""


# --------------------------------------------------------------------------------------------
# Images


def preprocess(images) -> tf.Tensor:
    """uint8 RGB, (H, W, 3) or (n, H, W, 3) -> float32 (n, 299, 299, 3) in [-1, 1]."""
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim not in (3, 4) or a.shape[-1] != 3:
        raise ValueError(f"images must be uint8 RGB arrays (H, W, 3) or (n, H, W, 3), as a PNG "
                         f"stores them; got {a.dtype} {a.shape}")
    if a.ndim == 3:
        a = a[None]
    x = tf.image.resize(tf.cast(a, tf.float32), (INCEPTION_SIZE, INCEPTION_SIZE),
                        method="bilinear", antialias=True)
    # The filter's weights are non-negative and sum to 1, so only float rounding can leave [-1, 1].
    return tf.clip_by_value(x / 127.5 - 1.0, -1.0, 1.0)


def load_real_image(path: str | Path) -> np.ndarray:
    """A real image framed as training frames it: uint8 (s, s, 3), s its longer side.

    Decoded to RGB and padded to a square on its own background colour, never cropped, by the
    training loader (:func:`fashion_sd.images.load_image`), but kept at its own size: the one
    resize is the extractor's, to 299.
    """
    from fashion_sd.images import load_image  # noqa: PLC0415 - one decoder for training and FID

    return load_image(path, None)


def real_image_features(extractor: FeatureExtractor, paths, batch_size: int | None = None,
                        progress=None) -> np.ndarray:
    """Features (n, 2048) of the real images at ``paths``, decoded one batch at a time.

    Catalogue photos are up to 2400 px a side, so they are never all held in memory at once.
    """
    batch_size = batch_size or extractor.batch_size
    paths = [str(p) for p in paths]
    starts = range(0, len(paths), batch_size)
    n = -(-len(paths) // batch_size)
    out = [extractor([load_real_image(p) for p in paths[s: s + batch_size]])
           for s in (progress(starts, "Inception features (real)", n) if progress else starts)]
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))


# --------------------------------------------------------------------------------------------
# Extractors


class FeatureExtractor:
    """Images in, Inception features (n, 2048) float64 out, in batches.

    ``name`` identifies the network and its weights (it keys the real-image stats cache),
    ``comparable`` is False for untrained weights, ``preprocessing`` is :data:`PREPROCESSING`.
    """

    def __init__(self, name: str, model, comparable: bool, batch_size: int = 32):
        self.name = name
        self.comparable = comparable
        self.preprocessing = PREPROCESSING
        self.batch_size = batch_size
        self._model = model  # float32 (b, 299, 299, 3) in [-1, 1] -> (b, 2048)

    def __repr__(self) -> str:
        return f"FeatureExtractor({self.name!r}, comparable={self.comparable})"

    def __call__(self, images, batch_size: int | None = None) -> np.ndarray:
        """``images``: a uint8 array (n, H, W, 3), or a list of uint8 (H, W, 3) of any sizes."""
        batch_size = batch_size or self.batch_size
        n = len(images)
        out = []
        for s in range(0, n, batch_size):
            chunk = images[s: s + batch_size]
            if isinstance(chunk, np.ndarray):
                x = preprocess(chunk)
            else:  # sizes may differ: each image is resized from its own size
                x = tf.concat([preprocess(im) for im in chunk], axis=0)
            f = np.asarray(self._model(x), dtype=np.float64).reshape(len(chunk), -1)
            if f.shape[1] != FEATURE_DIM:
                raise RuntimeError(f"{self.name} gave {f.shape[1]} features per image, expected "
                                   f"{FEATURE_DIM}; is this the FID Inception network?")
            out.append(f)
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))


def _keras_inception(weights):
    import keras  # noqa: PLC0415

    return keras.applications.InceptionV3(include_top=False, pooling="avg", weights=weights,
                                          input_shape=(INCEPTION_SIZE, INCEPTION_SIZE, 3))


def _keras_call(model):
    return lambda x: model(x, training=False)


def _load_tfhub(handle: str) -> FeatureExtractor:
    import tensorflow_hub as hub  # noqa: PLC0415

    local = Path(handle).expanduser()
    if "://" not in handle and not local.is_dir():
        raise InceptionUnavailable(f"TF-Hub module folder {handle} not found: unpack the module "
                                   f"there (see below) or pass its folder\n{_tfhub_help()}")
    try:
        module = hub.load(str(local) if local.is_dir() else handle)
    except Exception as exc:  # noqa: BLE001 - offline is URLError, others vary with the hub version
        raise InceptionUnavailable(f"cannot load the TF-Hub FID Inception from {handle}: "
                                   f"{type(exc).__name__}: {exc}\n{_tfhub_help()}") from exc
    # Verified against TF-GAN's source (tensorflow_gan/python/eval/inception_metrics.py and its
    # test's stand-in module): TF-GAN calls the loaded module directly on a float32 batch
    # (b, 299, 299, 3) in [-1, 1] and reads the 'pool_3' entry of the returned dict, flattened
    # to (b, 2048). Not verifiable offline: the real module itself (callable or only
    # `.signatures`, pool_3 as (b, 2048) or (b, 1, 1, 2048)), so both forms are handled and the
    # width is checked on every call.
    if callable(module):
        fn = module
    else:  # a TF1-format module: only signatures, called with keyword tensors
        sigs = getattr(module, "signatures", None) or {}
        sig = sigs.get("default") or next(iter(sigs.values()), None)
        inputs = list(sig.structured_input_signature[1]) if sig is not None else []
        if len(inputs) != 1:
            raise InceptionUnavailable(f"{handle} is not callable and has no one-input signature: "
                                       f"not the TF-GAN FID Inception module\n{_tfhub_help()}")
        fn = lambda x: sig(**{inputs[0]: x})  # noqa: E731

    def model(x):
        out = fn(x)
        if isinstance(out, dict):
            if "pool_3" not in out:
                raise RuntimeError(f"{handle} has no 'pool_3' output (it has {sorted(out)}): "
                                   "not the TF-GAN FID Inception module")
            out = out["pool_3"]
        return out

    name = "tfhub:tfgan-inception-1" if handle == TFHUB_HANDLE else f"tfhub:{handle}"
    return FeatureExtractor(name, model, comparable=True)


def _tfhub_help() -> str:
    return (f"Download {TFHUB_HANDLE}?tf-hub-format=compressed (a .tar.gz) on a machine with "
            f"internet, unpack it into a folder and pass that folder as the weights "
            f"(eval.inception_weights: DIR); or run once online: TF-Hub caches modules "
            f"in $TFHUB_CACHE_DIR (default: tfhub_modules in the system temp folder).")


def _load_keras(weights: str | None) -> FeatureExtractor:
    help_ = (f"Download {KERAS_WEIGHTS_URL} into ~/.keras/models/ (where Keras looks first) or "
             f"pass the file's path as the weights (eval.inception_weights: FILE).")
    if weights is not None and not Path(weights).expanduser().is_file():
        raise InceptionUnavailable(f"Keras InceptionV3 weights file {weights} not found. {help_}")
    try:
        model = _keras_inception(str(Path(weights).expanduser()) if weights else "imagenet")
    except Exception as exc:  # noqa: BLE001 - get_file raises a bare Exception offline
        raise InceptionUnavailable(f"cannot load Keras' ImageNet InceptionV3 weights: "
                                   f"{type(exc).__name__}: {exc}\n{help_}") from exc
    name = "keras:inception_v3-imagenet" if weights is None else f"keras:{weights}"
    return FeatureExtractor(name, _keras_call(model), comparable=True)


def untrained_extractor() -> FeatureExtractor:
    """InceptionV3 with random weights: right shapes, meaningless numbers (comparable=False).

    Builds offline in seconds. Each build draws new weights, so the name carries a hash of them:
    real-image stats cached for one untrained network are never reused for another.
    """
    model = _keras_inception(None)
    h = hashlib.sha256()
    for w in model.weights:
        h.update(np.ascontiguousarray(np.asarray(w)).tobytes())
    return FeatureExtractor(f"untrained:{h.hexdigest()[:12]}", _keras_call(model), comparable=False)


def load_extractor(backend: str, weights: str | None = None) -> FeatureExtractor:
    """The feature extractor for ``backend``: ``tfhub``, ``keras`` or ``auto`` (demo only).

    ``weights``: a local copy (tfhub: the unpacked module's folder; keras: the notop .h5 file);
    None downloads once and caches. Raises :class:`InceptionUnavailable`, saying what to
    download, when neither works. ``auto`` tries tfhub, then keras, then falls back to the
    untrained network with a warning.
    """
    if backend == "tfhub":
        return _load_tfhub(weights or TFHUB_HANDLE)
    if backend == "keras":
        return _load_keras(weights)
    if backend != "auto":
        raise ValueError(f"unknown Inception backend {backend!r}; use tfhub, keras or auto")
    if weights is not None:
        raise ValueError("weights names one backend's files; with weights choose backend tfhub "
                         "or keras, not auto")
    reasons = []
    for load in (lambda: _load_tfhub(TFHUB_HANDLE), lambda: _load_keras(None)):
        try:
            return load()
        except InceptionUnavailable as exc:
            reasons.append(str(exc).splitlines()[0])
    warnings.warn(
        "NO TRAINED INCEPTION WEIGHTS: FID and KID below come from a RANDOM-INIT network and mean "
        "nothing beyond this run (" + "; ".join(reasons) + "). Use backend tfhub or keras online, "
        "or pass downloaded weights.", UserWarning, stacklevel=2)
    return untrained_extractor()
