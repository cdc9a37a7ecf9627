"""From ``captions.csv`` to what a training step eats: images, caches of the frozen encoders, batches.

The text encoder and the VAE are frozen, so their outputs are computed once and cached on disk:
one context per distinct caption (the catalogue's 44k rows have 7k distinct captions) and the VAE
posterior moments of each image and its mirror image. A training step then runs only the U-Net.
A cache is keyed by the weights, the resolution and the exact data; a cache whose recorded key
differs from what is asked is rebuilt, never reused.

Batches are a pure function of (seed, step): the shuffle of each epoch, the flips, the timesteps
and every noise draw. Resuming at step k therefore continues the very same stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from fashion_sd.config import DataConfig
from fashion_sd.images import image_size, load_image
from fashion_sd.sd.tokenizer import MAX_LENGTH, tokenize
from fashion_sd.training import diffusion
from fashion_sd.training.cache import cache_key, file_id
from fashion_sd.training.diffusion import TRAIN_TIMESTEPS
from fashion_sd.training.shards import sharded

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Images (decoded by :func:`fashion_sd.images.load_image`)


def image_dataset(paths: list[str], resolution, batch_size: int) -> tf.data.Dataset:
    """Batches of (image, mirrored image) in [-1, 1], decoded in parallel by tf.data."""
    w, h = image_size(resolution)

    def decode(path):
        img = tf.numpy_function(lambda p: load_image(p.decode(), resolution), [path], tf.uint8)
        img = tf.reshape(img, (h, w, 3))
        img = tf.cast(img, tf.float32) / 127.5 - 1.0
        return tf.stack([img, tf.image.flip_left_right(img)])

    return (tf.data.Dataset.from_tensor_slices(paths)
            .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE))


# --------------------------------------------------------------------------------------------
# Text


def encode_text(text_encoder, tokens: np.ndarray, batch_size: int = 16, progress=None) -> np.ndarray:
    """Contexts (n, 77, 768) float32 from token ids, in batches."""
    positions = np.arange(MAX_LENGTH, dtype=np.int32)[None]
    out = []
    starts = range(0, len(tokens), batch_size)
    for s in (progress(starts, "encoding captions") if progress else starts):
        batch = tokens[s: s + batch_size]
        ctx = text_encoder([batch, np.repeat(positions, len(batch), 0)], training=False)
        out.append(np.asarray(ctx, dtype=np.float32))
    return np.concatenate(out) if out else np.zeros((0, MAX_LENGTH, 768), np.float32)


def vae_moments_model(image_encoder):
    """KerasCV's ImageEncoder up to the 8 posterior channels (mean, log-variance), unscaled.

    KerasCV's encoder returns only the scaled mean; training samples the posterior instead, as the
    reference trainers do, and :func:`fashion_sd.training.diffusion.sample_latents` applies the 0.18215.
    """

    return keras.Model(image_encoder.inputs, image_encoder.layers[-2].output)


def encode_images(image_encoder, paths: list[str], resolution, batch_size: int = 8,
                  progress=None) -> np.ndarray:
    """VAE posterior moments, (n, 2, h/8, w/8, 8) float32: each image and its mirror image."""
    w, h = image_size(resolution)
    moments = vae_moments_model(image_encoder)
    out = []
    batches = image_dataset(paths, resolution, batch_size)
    n = -(-len(paths) // batch_size)
    for pair in (progress(batches, "encoding images", n) if progress else batches):
        b = pair.shape[0]
        flat = tf.reshape(pair, (b * 2, h, w, 3))
        m = np.asarray(moments(flat, training=False), dtype=np.float32)
        out.append(m.reshape(b, 2, *m.shape[1:]))
    return np.concatenate(out) if out else np.zeros((0, 2, h // 8, w // 8, 8), np.float32)


@dataclass
class EncodedData:
    """Everything training needs from the frozen encoders, indexed by row of each split."""

    # Shard folders read memory-mapped (fashion_sd.training.shards.ShardedArray) or, in tests, arrays:
    moments: np.ndarray  # (n_images, 2, h, w, 8): VAE moments of each image, unflipped/flipped
    contexts: np.ndarray  # (n_captions + 1, 77, 768): one per distinct caption, and the empty one
    caption_index: np.ndarray  # (n_images,) row -> context
    splits: dict[str, np.ndarray]  # split name -> row numbers
    uncond_index: int = 0  # the empty prompt's row: the sampler's unconditional context
    # With lora.text_encoder the text encoder trains, so no contexts are cached: token ids
    # (n_captions + 1, 77) take their place and the step encodes them.
    tokens: np.ndarray | None = None

    @property
    def text(self) -> tuple[str, np.ndarray]:
        """The batch key and the array a caption row is gathered from."""
        return ("context", self.contexts) if self.tokens is None else ("tokens", self.tokens)


ENCODE_BATCH = 8  # images or captions per encoder call while filling the cache


def encode_dataset(table, comps, cfg: DataConfig, progress=None, text_cache: bool = True,
                   on_write=None) -> EncodedData:
    """Encode (or load from cache) the images and distinct captions of a captions table, at
    ``cfg.resolution``, in ``cfg.cache_dir``.

    Both caches are shard folders (:mod:`fashion_sd.training.shards`): written
    ``cfg.shard_rows`` rows at a time, resumed after an interruption, read memory-mapped. VAE
    moments are stored in ``cfg.cache_dtype``; text encodings in float32. ``text_cache=False``
    (the text encoder trains): captions are kept as token ids instead. ``on_write()`` follows
    every shard written.
    """
    cache_dir, resolution, batch_size = cfg.cache_dir, cfg.resolution, ENCODE_BATCH
    shard_rows, cache_dtype = cfg.shard_rows, cfg.cache_dtype
    if (table.image_path == "").any():
        raise ValueError("captions.csv has rows without image_path; build it with --images")
    paths = table.image_path.tolist()
    # The empty prompt too: tokenised as KerasCV's _UNCONDITIONAL_TOKENS, its encoding is the
    # context guidance subtracts, which caption dropout trains on (one cached row).
    distinct = sorted(set(table.caption) | {""})
    index = {c: i for i, c in enumerate(distinct)}
    weights_id = comps.source.id

    n_shards = -(-len(paths) // shard_rows)

    def text(start, stop):
        tokens, truncated = tokenize(distinct[start:stop], comps.tokenizer)
        if truncated:
            log.warning("%d caption(s) over %d tokens were truncated, e.g. %r",
                        len(truncated), MAX_LENGTH, truncated[0])
        return encode_text(comps.text_encoder, tokens, batch_size,
                           progress if len(distinct) <= shard_rows else None)

    def images(start, stop):  # one shard's bar, or one bar over many shards
        return encode_images(comps.image_encoder, paths[start:stop], resolution, batch_size,
                             progress if n_shards == 1 else None)

    text_dtype = comps.text_encoder.dtype_policy.compute_dtype
    image_dtype = comps.image_encoder.dtype_policy.compute_dtype
    tokens = contexts = None
    if text_cache:
        contexts = sharded(cache_dir, cache_key("text", weights_id, distinct, dtype=text_dtype),
                           len(distinct), text, "float32", shard_rows,
                           progress if len(distinct) > shard_rows else None, on_write,
                           row_shape=(MAX_LENGTH, 768))
    else:
        tokens = tokenize(distinct, comps.tokenizer)[0]
    moments = sharded(cache_dir, cache_key("images", weights_id, [file_id(p) for p in paths],
                                           resolution, dtype=image_dtype),
                      len(paths), images, cache_dtype, shard_rows,
                      progress if n_shards > 1 else None, on_write,
                      row_shape=(2, image_size(resolution)[1] // 8, image_size(resolution)[0] // 8, 8))
    splits = {name: np.flatnonzero((table.split == name).to_numpy()) for name in ("train", "val", "test")}
    return EncodedData(moments, contexts, np.array([index[c] for c in table.caption]), splits,
                       index[""], tokens)


# --------------------------------------------------------------------------------------------
# Batches as a function of (seed, step)


def batch_plan(n: int, batch_size: int, seed: int, start_step: int, end_step: int,
               flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers and flip bits, shape (steps, batch), for global steps [start, end).

    Epoch e visits a fresh seeded permutation of the rows, ``n // batch_size`` batches of it (the
    remainder waits for another epoch's shuffle, which keeps shapes static for XLA).
    """
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"{n} training images cannot fill one batch of {batch_size}; "
                         "lower train.batch_size or add data")
    rows, flips = [], []
    for epoch in range(start_step // per_epoch, -(-end_step // per_epoch)):
        perm = np.random.default_rng([seed, epoch]).permutation(n)[: per_epoch * batch_size]
        bits = (np.random.default_rng([seed, epoch, 1]).integers(0, 2, n) if flip
                else np.zeros(n, np.int64))
        lo, hi = max(start_step - epoch * per_epoch, 0), min(end_step - epoch * per_epoch, per_epoch)
        epoch_rows = perm.reshape(per_epoch, batch_size)[lo:hi]
        rows.append(epoch_rows)
        flips.append(bits[epoch_rows])
    if not rows:
        return np.zeros((0, batch_size), np.int64), np.zeros((0, batch_size), np.int64)
    return np.concatenate(rows).astype(np.int64), np.concatenate(flips).astype(np.int64)


def _noise(seed: int, stream: int, step, batch: int, latent_shape, offset: float = 0.0):
    """Standard-normal VAE and diffusion noise and uniform timesteps for one step, stateless.

    ``offset`` > 0 adds the noise offset from the step's fourth key (unused otherwise, so the
    other draws stay what they were without it).
    """
    s = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64) * 4 + stream])
    shape = tf.concat([[batch], latent_shape], 0)
    vae_eps = tf.random.stateless_normal(shape, seed=s)
    noise = tf.random.stateless_normal(shape, seed=s + [0, 1])
    t = tf.random.stateless_uniform([batch], seed=s + [0, 2], minval=0, maxval=TRAIN_TIMESTEPS,
                                    dtype=tf.int32)
    if offset:
        extra = tf.random.stateless_normal([batch, 1, 1, latent_shape[-1]], seed=s + [0, 3])
        noise = diffusion.offset_noise(noise, offset, extra)
    return vae_eps, noise, t


def caption_drops(seed: int, start_step: int, end_step: int, batch_size: int,
                  rate: float) -> np.ndarray:
    """Which samples of steps [start, end) train on the empty prompt, shape (steps, batch).

    A function of (seed, step) alone, like the rest of a batch, so a resumed run drops the same
    captions as an uninterrupted one.
    """
    out = np.zeros((max(0, end_step - start_step), batch_size), bool)
    if rate > 0:
        for i, step in enumerate(range(start_step, end_step)):
            out[i] = np.random.default_rng([seed, step, 3]).random(batch_size) < rate
    return out


@dataclass
class Batches:
    """How a run draws its batches; every draw is a function of (seed, step)."""

    batch_size: int
    seed: int
    flip: bool = True  # data.flip
    noise_offset: float = 0.0  # train.noise_offset
    caption_dropout: float = 0.0  # train.caption_dropout

    @classmethod
    def of(cls, cfg) -> Batches:
        """A run's batches, from its config."""
        t = cfg.train
        return cls(t.batch_size, cfg.seed, cfg.data.flip, t.noise_offset, t.caption_dropout)


def train_dataset(data: EncodedData, batches: Batches, start_step: int,
                  end_step: int) -> tf.data.Dataset:
    """Batches (dicts of moments, context, vae_eps, noise, timesteps) for global steps [start, end)."""
    batch_size, seed, flip = batches.batch_size, batches.seed, batches.flip
    noise_offset, caption_dropout = batches.noise_offset, batches.caption_dropout
    train_rows = data.splits["train"]
    rows, flips = batch_plan(len(train_rows), batch_size, seed, start_step, end_step, flip)
    rows = train_rows[rows]
    drops = caption_drops(seed, start_step, end_step, batch_size, caption_dropout)
    latent_shape = data.moments.shape[2:4] + (4,)

    key, text = data.text

    def gather(r, f, d):
        return data.moments[r, f], text[np.where(d, data.uncond_index, data.caption_index[r])]

    def make(step, r, f, d):
        m, c = tf.numpy_function(gather, [r, f, d], (tf.float32, tf.as_dtype(text.dtype)))
        m = tf.reshape(m, (batch_size, *data.moments.shape[2:]))
        c = tf.reshape(c, (batch_size, *text.shape[1:]))
        vae_eps, noise, t = _noise(seed, 0, step, batch_size, latent_shape, noise_offset)
        return {"moments": m, key: c, "vae_eps": vae_eps, "noise": noise, "timesteps": t}

    steps = np.arange(start_step, end_step, dtype=np.int64)
    return (tf.data.Dataset.from_tensor_slices((steps, rows, flips, drops))
            .map(make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


def val_dataset(data: EncodedData, batch_size: int, seed: int, repeats: int = 4) -> tf.data.Dataset | None:
    """The val split with the same noise and timesteps at every epoch, so epochs compare.

    Each image is scored at ``repeats`` timesteps spread over [0, 1000) (stratified, seeded),
    which averages out most of the timestep lottery that made the paper's val curve noise.
    Moments and text encodings stay where they are (one per image, one per distinct caption)
    and are gathered per batch; the noise is drawn statelessly from (seed, sample), so memory
    does not grow with ``repeats`` (a copy per row and repeat was 4 GB on the full catalogue).
    """
    rows = data.splits["val"]
    if len(rows) == 0:
        return None
    rng = np.random.default_rng([seed, 2**31 - 1])
    r = np.repeat(rows, repeats).astype(np.int64)
    strata = np.tile(np.arange(repeats), len(rows))
    t = ((strata + rng.random(len(r))) * TRAIN_TIMESTEPS / repeats).astype(np.int32)
    latent_shape = data.moments.shape[2:4] + (4,)

    key, text = data.text

    def gather(rr):
        return data.moments[rr, 0], text[data.caption_index[rr]]

    def make(i, rr, tt):
        n = tf.shape(rr)[0]
        m, c = tf.numpy_function(gather, [rr], (tf.float32, tf.as_dtype(text.dtype)))
        m = tf.reshape(m, (n, *data.moments.shape[2:]))
        c = tf.reshape(c, (n, *text.shape[1:]))
        # Each sample's own key, [seed, -8 (i + 1)] (+0, +1 below): negative, so never one of
        # the train stream's keys [seed, 4 step + k], k = 0..2.
        seeds = tf.stack([tf.fill([n], tf.cast(seed, tf.int64)), -8 * (i + 1)], axis=1)
        draw = lambda s, k: tf.random.stateless_normal(latent_shape, seed=s + [0, k])  # noqa: E731
        vae_eps = tf.map_fn(lambda s: draw(s, 0), seeds, fn_output_signature=tf.float32)
        noise = tf.map_fn(lambda s: draw(s, 1), seeds, fn_output_signature=tf.float32)
        return {"moments": m, key: c, "vae_eps": vae_eps, "noise": noise, "timesteps": tt}

    index = np.arange(len(r), dtype=np.int64)
    return (tf.data.Dataset.from_tensor_slices((index, r, t)).batch(batch_size)
            .map(make))
