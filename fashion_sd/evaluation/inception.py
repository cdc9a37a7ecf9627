"""Inception-v3 pool features (2048 per image) for FID and KID, from one of three networks.

Backends (:func:`load_extractor`):

- ``tfhub``: TF-GAN's FID Inception, https://tfhub.dev/tensorflow/tfgan/eval/inception/1, the
  2015 TensorFlow graph that the original FID code (TTUR) and pytorch-fid's weights come from;
  its ``pool_3`` output. The only network whose numbers may be read against papers (with the
  same protocol and set sizes).
- ``keras``: ``keras.applications.InceptionV3`` with ImageNet weights, global average pool.
  A close relative, not the same weights: its FIDs compare with each other only
  (``comparable`` False).
- ``untrained``: the same Keras network, randomly initialised, for tests and the offline demo;
  ``comparable`` is False and its numbers mean nothing outside one run.

Preprocessing: a named protocol (``eval.protocol``), the same for real and generated images:

0. Real images first pass through the training loader (:func:`load_real_image`): padded to the
   training aspect on their own background and resized to ``data.resolution``, exactly the
   pixels the model was trained to reproduce. Generated images are already that size. (Before
   this, real images went in at their own size and generated ones at the training size, so a
   model that reproduced its training set exactly still scored far from zero.)
1. To 299x299 by the protocol's resize, in float, clipped to [0, 255], never quantised:
   - ``clean``: clean-fid's "clean" resize (Parmar et al. 2022, https://arxiv.org/abs/2104.11222):
     PIL bicubic on each channel as a float image, which antialiases when shrinking. Equal to
     clean-fid's ``build_resizer("clean")``; compares with numbers computed in clean-fid's
     ``clean`` mode (its tables and leaderboards).
   - ``tensorflow2``: TensorFlow 2's bilinear resize, ``tf.image.resize(method="bilinear")``:
     half-pixel centres (source = (dst + 0.5) * in/out - 0.5), no antialiasing. Equal to
     clean-fid's ``make_resizer("TensorFlow", False, "bilinear")``, and the resize TF-GAN's own
     examples apply before ``tfgan.eval.frechet_inception_distance`` today (since October 2019
     TF-GAN has no preprocessing function; its tf.compat.v1 ``preprocess_image`` sampled as
     ``tensorflow1``). pytorch-fid (``pytorch_fid/inception.py``) samples the same way
     (``F.interpolate(mode="bilinear", align_corners=False)``, also unquantised; equal to this
     resize, tested) but on x / 255, then maps to 2 * x - 1 = (x - 127.5) / 127.5 instead of
     step 2's (x - 128) / 128, and through its own port of the weights: close to, not equal to,
     pytorch-fid's numbers.
   - ``tensorflow1``: TensorFlow 1's bilinear resize, the ``ResizeBilinear`` op with
     ``align_corners=False, half_pixel_centers=False`` (source = dst * in/out, no half-pixel
     offset), as ``tf.compat.v1.image.resize_bilinear``. This is the resize inside the 2015 FID
     graph that the original FID code (TTUR) feeds images through, and the one clean-fid's
     ``legacy_tensorflow`` mode leaves to its network (inception-2015-12-05.pt resizes inside).
     Compares with TTUR's numbers and clean-fid's ``legacy_tensorflow`` ones. Tested equal to
     TensorFlow's tf.compat.v1 function and to a closed form of that sampling; equality with
     clean-fid's legacy path itself is not tested (its network file cannot be downloaded here).
   Until PREPROCESSING v3, ``tensorflow2`` was called ``legacy_tensorflow``, a name that promised
   clean-fid's mode of that name (``tensorflow1`` here); the old name is now a config error.
2. (x - 128) / 128, the input range of the FID Inception (the 2015 graph's own mapping, as TF-GAN's
   former ``preprocess_image`` and clean-fid apply it).

FIDs compare only within one protocol, one network and one pair of set sizes; ``comparable``
(the published FID Inception, ``tfhub``) marks numbers that may be read against papers using
the same protocol.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
import tensorflow_hub as hub
from PIL import Image

from fashion_sd.errors import FashionSDError
from fashion_sd.images import load_image

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
TFHUB_HANDLE = "https://tfhub.dev/tensorflow/tfgan/eval/inception/1"
KERAS_WEIGHTS_URL = ("https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/"
                     "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5")
PROTOCOLS = ("clean", "tensorflow2", "tensorflow1")
# The version of the steps in the module docstring; with the protocol, part of every stats key.
# v3: legacy_tensorflow renamed tensorflow2, tensorflow1 added (stats cached under v2 recompute).
PREPROCESSING = "v3:train-loader/{protocol}-299/x-128/128"


def check_protocol(protocol: str) -> None:
    """ValueError unless ``protocol`` is one of :data:`PROTOCOLS`; the old name says its new one."""
    if protocol == "legacy_tensorflow":
        raise ValueError("FID protocol 'legacy_tensorflow' was renamed 'tensorflow2' (TensorFlow "
                         "2's half-pixel bilinear resize); clean-fid's legacy_tensorflow resizes "
                         "as TensorFlow 1 did: 'tensorflow1'")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown FID protocol {protocol!r}; use one of {PROTOCOLS}")


class InceptionUnavailable(FashionSDError, RuntimeError):
    """The requested Inception weights cannot be loaded (offline and not cached, or a bad path)."""


# --------------------------------------------------------------------------------------------
# Images


def _resize_clean(image: np.ndarray) -> np.ndarray:
    """clean-fid's "clean" resize: each channel as a float32 PIL image, bicubic, to 299."""

    size = (INCEPTION_SIZE, INCEPTION_SIZE)
    channels = [np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
                           .resize(size, resample=Image.Resampling.BICUBIC)) for c in range(3)]
    return np.stack(channels, axis=-1)


def resize(images: np.ndarray, protocol: str) -> np.ndarray:
    """uint8 (n, H, W, 3) -> float32 (n, 299, 299, 3) in [0, 255] by ``protocol``'s resize."""
    if protocol == "clean":
        x = np.stack([_resize_clean(im) for im in images])
    elif protocol == "tensorflow2":  # half-pixel centres
        x = tf.image.resize(tf.cast(images, tf.float32), (INCEPTION_SIZE, INCEPTION_SIZE),
                            method="bilinear").numpy()
    elif protocol == "tensorflow1":  # TF1's op as the 2015 FID graph runs it: no half-pixel offset
        x = tf.raw_ops.ResizeBilinear(images=tf.cast(images, tf.float32),
                                      size=[INCEPTION_SIZE, INCEPTION_SIZE],
                                      align_corners=False, half_pixel_centers=False).numpy()
    else:
        check_protocol(protocol)
    return np.clip(x, 0.0, 255.0).astype(np.float32)


def preprocess(images, protocol: str = "clean") -> tf.Tensor:
    """uint8 RGB, (H, W, 3) or (n, H, W, 3) -> float32 (n, 299, 299, 3) in [-1, 1)."""
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim not in (3, 4) or a.shape[-1] != 3:
        raise ValueError(f"images must be uint8 RGB arrays (H, W, 3) or (n, H, W, 3), as a PNG "
                         f"stores them; got {a.dtype} {a.shape}")
    if a.ndim == 3:
        a = a[None]
    return tf.constant((resize(a, protocol) - 128.0) / 128.0)


def load_real_image(path: str | Path, resolution) -> np.ndarray:
    """A real image as training sees it: uint8 at ``data.resolution``, padded to its aspect on
    its own background by the training loader (:func:`fashion_sd.images.load_image`)."""

    return load_image(path, resolution)


def real_image_features(extractor: FeatureExtractor, paths, resolution,
                        batch_size: int | None = None, progress=None) -> np.ndarray:
    """Features (n, 2048) of the real images at ``paths`` through the training loader at
    ``resolution``, decoded one batch at a time (catalogue photos are up to 2400 px a side)."""
    batch_size = batch_size or extractor.batch_size
    paths = [str(p) for p in paths]
    starts = range(0, len(paths), batch_size)
    n = -(-len(paths) // batch_size)
    out = [extractor(np.stack([load_real_image(p, resolution)
                                for p in paths[s: s + batch_size]]))
           for s in (progress(starts, "Inception features (real)", n) if progress else starts)]
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))


# --------------------------------------------------------------------------------------------
# Extractors


class FeatureExtractor:
    """Images in, Inception features (n, 2048) float64 out, in batches.

    ``name`` identifies the network and its weights (it keys the real-image stats cache);
    ``comparable`` is True only for the published FID Inception under a named protocol;
    ``preprocessing`` names the protocol's steps (:data:`PREPROCESSING`).
    """

    def __init__(self, name: str, model, comparable: bool, batch_size: int = 32,
                 protocol: str = "clean"):
        check_protocol(protocol)
        self.name = name
        self.comparable = comparable
        self.protocol = protocol
        self.preprocessing = PREPROCESSING.format(protocol=protocol)
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
                x = preprocess(chunk, self.protocol)
            else:  # sizes may differ: each image is resized from its own size
                x = tf.concat([preprocess(im, self.protocol) for im in chunk], axis=0)
            f = np.asarray(self._model(x), dtype=np.float64).reshape(len(chunk), -1)
            if f.shape[1] != FEATURE_DIM:
                raise RuntimeError(f"{self.name} gave {f.shape[1]} features per image, expected "
                                   f"{FEATURE_DIM}; is this the FID Inception network?")
            out.append(f)
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM))


def _keras_inception(weights):

    return keras.applications.InceptionV3(include_top=False, pooling="avg", weights=weights,
                                          input_shape=(INCEPTION_SIZE, INCEPTION_SIZE, 3))


def _keras_call(model):
    return lambda x: model(x, training=False)


def _load_tfhub(handle: str, protocol: str = "clean") -> FeatureExtractor:

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
    return FeatureExtractor(name, model, comparable=True, protocol=protocol)


def _tfhub_help() -> str:
    return (f"Download {TFHUB_HANDLE}?tf-hub-format=compressed (a .tar.gz) on a machine with "
            f"internet, unpack it into a folder and pass that folder as the weights "
            f"(eval.inception_weights: DIR); or run once online: TF-Hub caches modules "
            f"in $TFHUB_CACHE_DIR (default: tfhub_modules in the system temp folder).")


def _load_keras(weights: str | None, protocol: str = "clean") -> FeatureExtractor:
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
    # Not the published FID weights: its numbers compare with each other, never with papers.
    return FeatureExtractor(name, _keras_call(model), comparable=False, protocol=protocol)


def untrained_extractor(protocol: str = "clean", seed: int | None = 0) -> FeatureExtractor:
    """InceptionV3 with random weights: right shapes, meaningless numbers (comparable=False).

    Builds offline in seconds. ``seed`` fixes the weights, so the demo's numbers repeat from one
    process to the next (a sweep's runs, a rerun); None draws new ones. The name carries a hash
    of the weights: real-image stats cached for one untrained network are never reused for
    another.
    """
    state = random.getstate()
    if seed is not None:  # Keras draws the seeds of unseeded initializers from Python's random
        random.seed(seed)
    try:
        model = _keras_inception(None)
    finally:
        random.setstate(state)
    h = hashlib.sha256()
    for w in model.weights:
        h.update(np.ascontiguousarray(np.asarray(w)).tobytes())
    return FeatureExtractor(f"untrained:{h.hexdigest()[:12]}", _keras_call(model), comparable=False,
                            protocol=protocol)


def load_extractor(backend: str, weights: str | None = None,
                   protocol: str = "clean") -> FeatureExtractor:
    """The feature extractor for ``backend``: ``tfhub``, ``keras`` or ``auto`` (demo only).

    ``weights``: a local copy (tfhub: the unpacked module's folder; keras: the notop .h5 file);
    None downloads once and caches. Raises :class:`InceptionUnavailable`, saying what to
    download, when neither works. ``auto`` tries tfhub, then keras, then falls back to the
    untrained network with a warning.
    """
    if backend == "tfhub":
        return _load_tfhub(weights or TFHUB_HANDLE, protocol)
    if backend == "keras":
        return _load_keras(weights, protocol)
    if backend != "auto":
        raise ValueError(f"unknown Inception backend {backend!r}; use tfhub, keras or auto")
    if weights is not None:
        raise ValueError("weights names one backend's files; with weights choose backend tfhub "
                         "or keras, not auto")
    reasons = []
    for load in (lambda: _load_tfhub(TFHUB_HANDLE, protocol), lambda: _load_keras(None, protocol)):
        try:
            return load()
        except InceptionUnavailable as exc:
            reasons.append(str(exc).splitlines()[0])
    warnings.warn(
        "NO TRAINED INCEPTION WEIGHTS: FID and KID below come from a RANDOM-INIT network and mean "
        "nothing beyond this run (" + "; ".join(reasons) + "). Use backend tfhub or keras online, "
        "or pass downloaded weights.", UserWarning, stacklevel=2)
    return untrained_extractor(protocol)
