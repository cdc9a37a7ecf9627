"""A training step's random draws as a pure function of (seed, step): NumPy's counter-based
Philox generator, so every backend (and every machine) draws the same numbers.

Each quantity of a step comes from its own Philox4x64-10 key (Salmon et al. 2011, "Parallel
random numbers: as easy as 1, 2, 3"), the generator's counter starting at 0. The 128-bit key is
two 64-bit words::

    word 0 = seed + 2**32 * stream       seed in [0, 2**32) (config.SEED_RULE), stream below
    word 1 = step                        train: the global micro-batch step, in [0, 2**63)
           = 2**63 + sample              val: the sample's index in the val plan, in [0, 2**63)

    stream 0 VAE_EPS    the VAE posterior's standard normal, (batch, h, w, 4) float32
           1 NOISE      the diffusion noise, (batch, h, w, 4) float32
           2 TIMESTEPS  uniform integers in [0, 1000), (batch,) int32
           3 OFFSET     the noise offset's extra normal, (batch, 1, 1, 4) float32

The map (seed, stream, word 1) -> key is one to one, so no two draws share a key. The val keys
have word 1's top bit set (negative as an int64, as the TensorFlow draws' val keys were) and
train steps never do: the two splits never draw the same numbers. One key per quantity, so
turning the noise offset on leaves the other draws as they were, and a val sample's noise does
not depend on the batch it lands in.

What else a batch draws was NumPy already and is unchanged (``fashion_sd.training.data``): the
epoch's shuffle and flips (``default_rng([seed, epoch])``, ``[seed, epoch, 1]``), caption
dropout (``[seed, step, 3]``) and the val timesteps (``[seed, 2**31 - 1]``).

Versions, as a train state's ``info["draws"]`` records them: :data:`DRAWS` is this scheme;
:data:`LEGACY` the one before it (TensorFlow's ``tf.random.stateless_*`` keyed ``[seed, 4 step
+ k]``, in ``data._legacy_noise``), which runs started before this module continue with on
TensorFlow, and which no other backend can draw. The numbers are Philox's bits (fixed by the
algorithm) turned into float32 normals (ziggurat) and bounded integers (Lemire) by NumPy's
``Generator``, unchanged since NumPy 1.17; NEP 19 allows a future NumPy to change those
methods, which ``tests/training/test_draws.py``'s pinned values would show.

Imports only numpy.
"""

from __future__ import annotations

import numpy as np

DRAWS = "philox-1"  # what every new train state records
LEGACY = "tf-stateless"  # runs whose train state records no draws drew so, on TensorFlow

VAE_EPS, NOISE, TIMESTEPS, OFFSET = 0, 1, 2, 3
TRAIN_TIMESTEPS = 1000  # diffusion.TRAIN_TIMESTEPS (that module imports Keras)
VAL = 2**63  # word 1's top bit: the val split's keys


def philox_key(seed: int, stream: int, word: int) -> np.ndarray:
    """The 128-bit Philox key (two uint64 words, low first) of ``seed``, ``stream`` and word 1
    (a train step, or ``VAL + sample``): see the module docstring."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed {seed} out of [0, 2**32)")
    if not 0 <= stream < 2**32:
        raise ValueError(f"stream {stream} out of [0, 2**32)")
    if not 0 <= word < 2**64:
        raise ValueError(f"key word {word} out of [0, 2**64)")
    return np.array([seed + (stream << 32), word], dtype=np.uint64)


def generator(seed: int, stream: int, word: int) -> np.random.Generator:
    """A fresh Generator on the Philox key of (seed, stream, word), its counter at 0."""
    return np.random.Generator(np.random.Philox(key=philox_key(seed, stream, word)))


def _step(step: int) -> int:
    step = int(step)
    if not 0 <= step < VAL:
        raise ValueError(f"step {step} out of [0, 2**63)")
    return step


def train_draws(seed: int, step: int, batch: int, latent_shape,
                offset: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vae_eps, noise, timesteps) of train step ``step``: standard normals (batch,
    *latent_shape) float32, uniform integers in [0, 1000) (batch,) int32.

    ``offset`` > 0 adds the noise offset, ``noise + offset * extra`` with ``extra`` one standard
    normal per sample and channel (``diffusion.offset_noise``, in float32 as it computes it),
    drawn from its own stream.
    """
    step = _step(step)
    shape = (batch, *tuple(int(d) for d in latent_shape))
    vae_eps = generator(seed, VAE_EPS, step).standard_normal(shape, dtype=np.float32)
    noise = generator(seed, NOISE, step).standard_normal(shape, dtype=np.float32)
    timesteps = generator(seed, TIMESTEPS, step).integers(0, TRAIN_TIMESTEPS, batch,
                                                          dtype=np.int32)
    if offset:
        extra = generator(seed, OFFSET, step).standard_normal((batch, 1, 1, shape[-1]),
                                                              dtype=np.float32)
        noise = noise + np.float32(offset) * extra
    return vae_eps, noise, timesteps


def val_draws(seed: int, samples, latent_shape) -> tuple[np.ndarray, np.ndarray]:
    """(vae_eps, noise), each (len(samples), *latent_shape) float32: every val sample's own
    standard normals, keyed by its index in the val plan (so batching changes none of them)."""
    shape = tuple(int(d) for d in latent_shape)
    vae_eps = np.empty((len(samples), *shape), np.float32)
    noise = np.empty_like(vae_eps)
    for j, sample in enumerate(samples):
        word = VAL + _step(sample)
        vae_eps[j] = generator(seed, VAE_EPS, word).standard_normal(shape, dtype=np.float32)
        noise[j] = generator(seed, NOISE, word).standard_normal(shape, dtype=np.float32)
    return vae_eps, noise
