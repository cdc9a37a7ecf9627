"""From ``captions.csv`` to what a training step eats: images, caches of the frozen encoders, batches.

The text encoder and the VAE are frozen, so their outputs are computed once and cached on disk:
one context per distinct caption (the catalogue's 44k rows have 7k distinct captions) and the VAE
posterior moments of each image and its mirror image. A training step then runs only the U-Net.
A cache is keyed by the weights, the resolution and the exact data; a cache whose recorded key
differs from what is asked is rebuilt, never reused.

Batches are a pure function of (seed, step): the shuffle of each epoch, the flips, the timesteps
and every noise draw (:mod:`fashion_sd.training.draws`). Resuming at step k therefore continues
the very same stream, on any backend: :class:`TrainBatches` and :class:`ValBatches` compute them
with numpy from the memory-mapped caches (a Keras ``PyDataset``); on TensorFlow,
:func:`train_dataset` and :func:`val_dataset` run the same numpy function in a tf.data pipeline.

Filling the caches (:func:`encode_dataset`) decodes images with NumPy on threads, on every backend.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import keras
import numpy as np

try:
    import tensorflow as tf
except ImportError:  # Keras on JAX without TensorFlow: the batches need none (encoding does)
    tf = None

from fashion_sd.config import DataConfig
from fashion_sd.images import image_size, load_image
from fashion_sd.sd.tokenizer import MAX_LENGTH, tokenize
from fashion_sd.sd import diffusion
from fashion_sd.training import draws
from fashion_sd.cache import cache_key, file_id
from fashion_sd.sd.diffusion import TRAIN_TIMESTEPS
from fashion_sd.training.draws import DRAWS, LEGACY
from fashion_sd.training.shards import sharded

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Images (decoded by :func:`fashion_sd.images.load_image`)


def image_dataset(paths: list[str], resolution, batch_size: int):
    """Batches of (image, mirrored image) in [-1, 1], float32 (b, 2, h, w, 3), in order.

    NumPy on every backend: images are decoded on threads (PIL releases the GIL), a batch ahead
    of the encoder; the float arithmetic is what tf.data did (x / 127.5 - 1 in float32), so
    caches filled before are the same.
    """

    def pair(path):
        img = load_image(path, resolution).astype(np.float32) / np.float32(127.5) - np.float32(1)
        return np.stack([img, img[:, ::-1]])

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        starts = range(0, len(paths), batch_size)
        pending = None
        for s in starts:
            ahead = pool.map(pair, paths[s: s + batch_size])  # this batch decodes while ...
            if pending is not None:
                yield np.stack(list(pending))  # ... the one before is handed over
            pending = ahead
        if pending is not None:
            yield np.stack(list(pending))


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
    reference trainers do, and :func:`fashion_sd.sd.diffusion.sample_latents` applies the 0.18215.
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
        flat = pair.reshape(b * 2, h, w, 3)
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
    # With train.mask_background_weight: (n_images, 2, h, w) each image's mask and its mirror's
    # at the latent grid (fashion_sd.training.masks)
    masks: np.ndarray | None = None
    mask_summary: dict | None = None  # masks.describe: photos masked, unmasked, garment share

    @property
    def text(self) -> tuple[str, np.ndarray]:
        """The batch key and the array a caption row is gathered from."""
        return ("context", self.contexts) if self.tokens is None else ("tokens", self.tokens)


ENCODE_BATCH = 8  # images or captions per encoder call while filling the cache


def encode_dataset(table, comps, cfg: DataConfig, progress=None, text_cache: bool = True,
                   on_write=None, masks: bool = False) -> EncodedData:
    """Encode (or load from cache) the images and distinct captions of a captions table, at
    ``cfg.resolution``, in ``cfg.cache_dir``.

    Both caches are shard folders (:mod:`fashion_sd.training.shards`): written
    ``cfg.shard_rows`` rows at a time, resumed after an interruption, read memory-mapped. VAE
    moments are stored in ``cfg.cache_dtype``; text encodings in float32. ``text_cache=False``
    (the text encoder trains): captions are kept as token ids instead. ``on_write()`` follows
    every shard written. ``masks``: each image's loss mask too (:mod:`~fashion_sd.training.masks`),
    cached beside the moments in float16 (a latent cell's share of garment, k / 64, is exact).
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
    mask_cache = _masks(table, cfg, on_write, progress if n_shards > 1 else None) if masks else None
    splits = {name: np.flatnonzero((table.split == name).to_numpy()) for name in ("train", "val", "test")}
    return EncodedData(moments, contexts, np.array([index[c] for c in table.caption]), splits,
                       index[""], tokens, mask_cache, _describe(mask_cache, splits["train"]))


def _describe(mask_cache, train_rows) -> dict | None:
    if mask_cache is None:
        return None
    from fashion_sd.training import masks  # noqa: PLC0415

    return masks.describe(mask_cache, train_rows)


def _masks(table, cfg: DataConfig, on_write, progress):
    """The loss masks' shard folder, keyed by the images, their mask files and how masks are made."""
    from fashion_sd.training import masks  # noqa: PLC0415 - scipy's morphology, only with masks

    paths = table.image_path.tolist()
    mask_paths = ([m if isinstance(m, str) and m else None for m in table["mask"]]
                  if "mask" in table.columns else [None] * len(paths))
    w, h = image_size(cfg.resolution)
    # No weights make a mask: the "weights" slot names how masks are made instead.
    key = cache_key("masks", f"masks-v{masks.MASK_VERSION}",
                    [[file_id(p), file_id(m) if m else None] for p, m in zip(paths, mask_paths)],
                    cfg.resolution)

    def compute(start, stop):
        made, sources = masks.latent_masks(paths[start:stop], cfg.resolution,
                                           mask_paths[start:stop])
        log.info("loss masks %d-%d: %s", start, stop, dict(sources))
        return made

    return sharded(cfg.cache_dir, key, len(paths), compute, "float16", cfg.shard_rows, progress,
                   on_write, row_shape=(2, h // 8, w // 8))


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
    """How a run draws its batches; every draw is a function of (seed, step).

    ``draws`` names the scheme (:mod:`fashion_sd.training.draws`): :data:`DRAWS` for every new
    run; :data:`LEGACY` continues a run begun before it (TensorFlow only).
    """

    batch_size: int
    seed: int
    flip: bool = True  # data.flip
    noise_offset: float = 0.0  # train.noise_offset
    caption_dropout: float = 0.0  # train.caption_dropout
    draws: str = DRAWS

    @classmethod
    def of(cls, cfg, version: str = DRAWS) -> Batches:
        """A run's batches, from its config and the draws' version it records."""
        t = cfg.train
        return cls(t.batch_size, cfg.seed, cfg.data.flip, t.noise_offset, t.caption_dropout,
                   version)


AHEAD = 4  # batches a PyDataset computes ahead of the one the step reads
THREADS = min(4, os.cpu_count() or 1)


class _Ahead:
    """``fn(i)`` for the ``i`` asked, with ``fn(i + 1) .. fn(i + depth)`` computed meanwhile on
    threads (NumPy's gathers and Philox fills release the GIL). ``fn`` is a pure function of
    ``i``, so what comes back never depends on timing; an index asked out of order is simply
    computed then."""

    def __init__(self, fn, n: int, depth: int = AHEAD, threads: int = THREADS):
        self.fn, self.n, self.depth, self.threads = fn, n, depth, threads
        self.pool = None  # started at the first call: a tf.data pipeline never needs it
        self.pending: dict[int, Future] = {}
        self.lock = threading.Lock()

    def __call__(self, i: int):
        if not self.depth:
            return self.fn(i)
        with self.lock:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="batches")
                weakref.finalize(self, self.pool.shutdown, wait=False, cancel_futures=True)
            for j in [j for j in self.pending if not i <= j <= i + self.depth]:
                self.pending.pop(j).cancel()
            for j in range(i, min(self.n, i + self.depth + 1)):
                if j not in self.pending:
                    self.pending[j] = self.pool.submit(self.fn, j)
            future = self.pending.pop(i)
        return future.result()


class _Source(keras.utils.PyDataset):
    """What the train and val batches share: numpy dicts by index, computed ahead.

    Keras reads it in order on one thread (``workers=1``), because its worker pool
    (``workers > 1``) restarts at index 0 after each epoch when ``fit`` runs several epochs of
    ``steps_per_epoch`` over one dataset, replaying the first batches (Keras 3.15); the next
    ``ahead`` batches are computed here instead, on ``threads`` threads, while a step runs.
    """

    def __init__(self, n: int, ahead: int, threads: int):
        super().__init__(workers=1, use_multiprocessing=False)
        self._n = n
        self._ahead = _Ahead(self.batch, n, ahead, threads)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self._n:
            raise IndexError(f"batch {i} of {self._n}")
        return self._ahead(int(i))

    def batch(self, i: int) -> dict:
        """Batch ``i``, computed now (thread-safe: a pure function of ``i``)."""
        return {**self.inputs(i), **self.draws(i)}

    def spec(self) -> dict[str, tuple[tuple, np.dtype]]:
        """Each key's (shape, dtype); ``None`` where the batch dimension varies."""
        raise NotImplementedError


class TrainBatches(_Source):
    """The train batches of global steps [start, end) as dicts of numpy arrays, for every
    backend: item ``i`` is step ``start + i``. Moments are gathered from the (memory-mapped)
    cache with the step's flips, the text context (or tokens) with caption dropout, and the
    VAE noise, diffusion noise and timesteps come from :func:`draws.train_draws`.

    Example:
        source = TrainBatches(encoded, Batches(8, seed=42), 0, 100)
        source[0]  # {"moments", "context", "vae_eps", "noise", "timesteps"} of step 0
    """

    def __init__(self, data: EncodedData, batches: Batches, start: int, end: int,
                 ahead: int = AHEAD, threads: int = THREADS):
        self.data, self.batches, self.start = data, batches, start
        b = batches
        train_rows = data.splits["train"]
        rows, self.flips = batch_plan(len(train_rows), b.batch_size, b.seed, start, end, b.flip)
        self.rows = train_rows[rows]
        self.drops = caption_drops(b.seed, start, end, b.batch_size, b.caption_dropout)
        self.latent_shape = tuple(data.moments.shape[2:4]) + (4,)
        super().__init__(max(0, end - start), ahead, threads)

    def inputs(self, i: int) -> dict:
        """Step ``start + i``'s moments (flipped as planned) and text (dropped as planned)."""
        d, r = self.data, self.rows[i]
        key, text = d.text
        caption = np.where(self.drops[i], d.uncond_index, d.caption_index[r])
        out = {"moments": np.asarray(d.moments[r, self.flips[i]], np.float32),
               key: np.asarray(text[caption])}
        if d.masks is not None:  # the flipped image's mask for a flipped step
            out["mask"] = np.asarray(d.masks[r, self.flips[i]], np.float32)[..., None]
        return out

    def draws(self, i: int) -> dict:
        """Step ``start + i``'s VAE noise, diffusion noise and timesteps."""
        b = self.batches
        vae_eps, noise, t = draws.train_draws(b.seed, self.start + i, b.batch_size,
                                              self.latent_shape, b.noise_offset)
        return {"vae_eps": vae_eps, "noise": noise, "timesteps": t}

    def spec(self) -> dict[str, tuple[tuple, np.dtype]]:
        key, text = self.data.text
        n, latent = self.batches.batch_size, self.latent_shape
        masks = self.data.masks
        return {"moments": ((n, *self.data.moments.shape[2:]), np.dtype(np.float32)),
                key: ((n, *text.shape[1:]), np.dtype(text.dtype)),
                **({"mask": ((n, *masks.shape[2:], 1), np.dtype(np.float32))}
                   if masks is not None else {}),
                "vae_eps": ((n, *latent), np.dtype(np.float32)),
                "noise": ((n, *latent), np.dtype(np.float32)),
                "timesteps": ((n,), np.dtype(np.int32))}


class ValBatches(_Source):
    """The val split with the same noise and timesteps at every epoch, so epochs compare.

    Each image is scored at ``repeats`` timesteps spread over [0, 1000) (stratified, seeded),
    which averages out most of the timestep lottery that made the paper's val curve noise.
    Moments and text encodings stay where they are (one per image, one per distinct caption)
    and are gathered per batch; each sample's noise is drawn from its own key
    (:func:`draws.val_draws`), so memory does not grow with ``repeats`` (a copy per row and
    repeat was 4 GB on the full catalogue) and the batch size changes no sample's noise.

    Example:
        ValBatches(encoded, 8, seed=42)[0]  # the first 8 samples, unflipped, fixed noise
    """

    def __init__(self, data: EncodedData, batch_size: int, seed: int, repeats: int = 4,
                 ahead: int = AHEAD, threads: int = THREADS):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        rows = data.splits["val"]
        rng = np.random.default_rng([seed, 2**31 - 1])
        self.rows = np.repeat(rows, repeats).astype(np.int64)
        strata = np.tile(np.arange(repeats), len(rows))
        self.timesteps = ((strata + rng.random(len(self.rows))) * TRAIN_TIMESTEPS
                          / repeats).astype(np.int32)
        self.latent_shape = tuple(data.moments.shape[2:4]) + (4,)
        super().__init__(-(-len(self.rows) // batch_size), ahead, threads)

    def _samples(self, i: int) -> slice:
        return slice(i * self.batch_size, (i + 1) * self.batch_size)

    def inputs(self, i: int) -> dict:
        d, r = self.data, self.rows[self._samples(i)]
        key, text = d.text
        return {"moments": np.asarray(d.moments[r, 0], np.float32),
                key: np.asarray(text[d.caption_index[r]])}

    def draws(self, i: int) -> dict:
        s = self._samples(i)
        samples = range(len(self.rows))[s]
        vae_eps, noise = draws.val_draws(self.seed, samples, self.latent_shape)
        return {"vae_eps": vae_eps, "noise": noise, "timesteps": self.timesteps[s]}

    def spec(self) -> dict[str, tuple[tuple, np.dtype]]:
        key, text = self.data.text
        latent = self.latent_shape
        return {"moments": ((None, *self.data.moments.shape[2:]), np.dtype(np.float32)),
                key: ((None, *text.shape[1:]), np.dtype(text.dtype)),
                "vae_eps": ((None, *latent), np.dtype(np.float32)),
                "noise": ((None, *latent), np.dtype(np.float32)),
                "timesteps": ((None,), np.dtype(np.int32))}


def train_dataset(data: EncodedData, batches: Batches, start_step: int, end_step: int):
    """The train batches of global steps [start, end) for the backend Keras runs on.

    On TensorFlow a ``tf.data.Dataset`` (what multi-worker and ``tf.distribute`` read) whose
    batches are :class:`TrainBatches`' own, computed by the same numpy function; with
    ``batches.draws == LEGACY``, the TensorFlow draws of runs begun before (their VAE noise,
    noise and timesteps; moments and text are the same). On any other backend the
    :class:`TrainBatches` PyDataset itself.
    """
    return _pipeline(TrainBatches(data, batches, start_step, end_step), batches.draws,
                     _legacy_train)


def val_dataset(data: EncodedData, batch_size: int, seed: int, repeats: int = 4,
                version: str = DRAWS):
    """The :class:`ValBatches` for the backend Keras runs on (as :func:`train_dataset`), or
    None when the val split is empty."""
    if len(data.splits["val"]) == 0:
        return None
    return _pipeline(ValBatches(data, batch_size, seed, repeats), version, _legacy_val)


def _pipeline(source: _Source, version: str, legacy):
    """tf.data on TensorFlow (``legacy(source)`` for LEGACY draws), else ``source`` itself."""
    if version not in (DRAWS, LEGACY):
        raise ValueError(f"draws {version!r}: this version of fashion-sd draws {DRAWS!r} (or "
                         f"{LEGACY!r} for runs begun before it)")
    if keras.config.backend() == "tensorflow":
        return legacy(source) if version == LEGACY else _tf_batches(source)
    if version == LEGACY:
        raise ValueError(f"draws {LEGACY!r} are TensorFlow's stateless ops: only Keras' "
                         "tensorflow backend draws them")
    return source


# --------------------------------------------------------------------------------------------
# tf.data over the numpy batches, and the TensorFlow draws of runs begun before (LEGACY)


def _numpy_map(part, spec: dict):
    """A tf.data map function: ``part(i)`` (a dict of numpy arrays) through ``tf.numpy_function``,
    shaped as ``spec`` says."""
    keys = list(spec)

    def arrays(i):
        out = part(int(i))
        return [out[k] for k in keys]

    def make(i):
        got = tf.numpy_function(arrays, [i], [tf.as_dtype(spec[k][1]) for k in keys])
        return {k: tf.ensure_shape(a, spec[k][0]) for k, a in zip(keys, got)}

    return make


def _tf_batches(source: _Source) -> tf.data.Dataset:
    """``source``'s batches, bit for bit, as a tf.data pipeline (a parallel, ordered map)."""
    return (tf.data.Dataset.range(len(source))
            .map(_numpy_map(source.batch, source.spec()),
                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


def _legacy_noise(seed: int, stream: int, step, batch: int, latent_shape, offset: float = 0.0):
    """LEGACY: the VAE and diffusion noise and timesteps of one step as runs begun before
    :data:`DRAWS` drew them (TensorFlow's stateless ops keyed ``[seed, 4 step + k]``); kept so
    those runs resume bit for bit.

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


def _legacy_train(source: TrainBatches) -> tf.data.Dataset:
    """LEGACY train batches: :class:`TrainBatches`' moments and text, TensorFlow's draws."""
    b = source.batches
    spec = {k: v for k, v in source.spec().items()
            if k in ("moments", "context", "tokens", "mask")}
    inputs = _numpy_map(source.inputs, spec)

    def make(i):
        vae_eps, noise, t = _legacy_noise(b.seed, 0, source.start + i, b.batch_size,
                                          source.latent_shape, b.noise_offset)
        return {**inputs(i), "vae_eps": vae_eps, "noise": noise, "timesteps": t}

    return (tf.data.Dataset.range(len(source))
            .map(make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


def _legacy_val(source: ValBatches) -> tf.data.Dataset:
    """LEGACY val batches: :class:`ValBatches`' plan, each sample's TensorFlow draws."""
    seed, latent_shape = source.seed, source.latent_shape
    spec = {k: v for k, v in source.spec().items() if k in ("moments", "context", "tokens")}
    inputs = _numpy_map(source.inputs, spec)

    def make(b, i, tt):
        n = tf.shape(i)[0]
        # Each sample's own key, [seed, -8 (i + 1)] (+0, +1 below): negative, so never one of
        # the train stream's keys [seed, 4 step + k], k = 0..2.
        seeds = tf.stack([tf.fill([n], tf.cast(seed, tf.int64)), -8 * (i + 1)], axis=1)
        draw = lambda s, k: tf.random.stateless_normal(latent_shape, seed=s + [0, k])  # noqa: E731
        vae_eps = tf.map_fn(lambda s: draw(s, 0), seeds, fn_output_signature=tf.float32)
        noise = tf.map_fn(lambda s: draw(s, 1), seeds, fn_output_signature=tf.float32)
        return {**inputs(b), "vae_eps": vae_eps, "noise": noise, "timesteps": tt}

    index = np.arange(len(source.rows), dtype=np.int64)
    batch = index // source.batch_size
    return (tf.data.Dataset.from_tensor_slices((batch, index, source.timesteps))
            .batch(source.batch_size)
            .map(lambda b, i, tt: make(b[0], i, tt)))
