"""DDIM sampling with classifier-free guidance, as KerasCV's ``StableDiffusion.generate_image``.

Song et al. 2021 (DDIM, eta = 0) guided as in Ho & Salimans 2022. Each step's arithmetic is
KerasCV's, operation for operation and in the same order, so the images are the ones KerasCV's
loop made from the same models and noise (``tests/serving/test_ddim.py``: bit for bit). The
U-Net and the decoder are callables, so this module imports neither TensorFlow nor KerasCV and
runs on any Keras backend; callers wrap their models as they need (one process alone, a
compiled function). Guidance and the update run in float32 whatever the U-Net's dtype: in
bfloat16 (8 bits of mantissa) every step would round.

    latents = denoise(unet, noise, (context, unconditional), steps=50, guidance=7.5)
    images = decode(decoder, latents)  # uint8 (batch, H, W, 3), rounded
"""

from __future__ import annotations

import functools
import math

import numpy as np
from keras import ops

from fashion_sd.sd.diffusion import TRAIN_TIMESTEPS, alphas_cumprod, timestep_embedding


def timesteps(num_steps: int) -> np.ndarray:
    """The ``num_steps`` training timesteps DDIM visits, ascending (the loop walks them down).

    ``round(i * 999 / (num_steps - 1))`` for ``i < num_steps``, half to even as numpy rounds
    (3 steps: 0, 500, 999); one step is timestep 0 alone. KerasCV's float expression, kept as is:
    it rounds the float product, so an exact half can fall below (27 steps: 13 * 999 / 26 =
    499.5 is 499.49999999999994 and gives 499, not 500; 92 of the counts 2..1000 have such a step).
    """
    if num_steps < 1:
        raise ValueError(f"DDIM needs at least one step, got {num_steps}")
    ratio = (TRAIN_TIMESTEPS - 1) / (num_steps - 1) if num_steps > 1 else TRAIN_TIMESTEPS
    return (np.arange(0, num_steps) * ratio).round().astype(np.int64)


@functools.lru_cache(maxsize=1)
def sampler_alphas_cumprod() -> tuple[float, ...]:
    """KerasCV's ``_ALPHAS_CUMPROD``: :func:`~fashion_sd.sd.diffusion.alphas_cumprod`, each
    value rounded to float32 and read back from its shortest decimal (the table was printed from
    a float32 array; all 1000 values match).

    The two tables are equal in float32, but the update takes square roots of these float64
    numbers: the exact schedule would change a float32 coefficient at 313 of the 1000 timesteps.
    """
    return tuple(float(str(a)) for a in alphas_cumprod().astype(np.float32))


def alphas(steps: np.ndarray) -> tuple[list[float], list[float]]:
    """:math:`\\bar\\alpha` at each of ``steps`` and at the one visited after it (the step
    before it in the list; 1.0, the clean image, after timestep ``steps[0]``)."""
    table = sampler_alphas_cumprod()
    a = [table[t] for t in steps]
    return a, [1.0] + a[:-1]


def guided_epsilon(unconditional, conditional, guidance: float):
    """Classifier-free guidance in float32: :math:`\\epsilon_u + g (\\epsilon_c - \\epsilon_u)`
    (Ho & Salimans 2022, eq. 6; their w is g - 1). g = 1 is the conditional prediction alone."""
    u = ops.cast(unconditional, "float32")
    return u + float(guidance) * (ops.cast(conditional, "float32") - u)


def ddim_update(latent, epsilon, alpha: float, alpha_prev: float):
    """One deterministic DDIM step (Song et al. 2021, eq. 12 with sigma = 0), in float32:

    :math:`\\hat x_0 = (x_t - \\sqrt{1-\\bar\\alpha_t}\\,\\epsilon) / \\sqrt{\\bar\\alpha_t}`,
    :math:`x_{prev} = \\sqrt{1-\\bar\\alpha_{prev}}\\,\\epsilon + \\sqrt{\\bar\\alpha_{prev}}\\,\\hat x_0`.
    The square roots are taken in float64, as KerasCV takes them.
    """
    latent, epsilon = ops.cast(latent, "float32"), ops.cast(epsilon, "float32")
    pred_x0 = (latent - math.sqrt(1 - alpha) * epsilon) / math.sqrt(alpha)
    return epsilon * math.sqrt(1.0 - alpha_prev) + math.sqrt(alpha_prev) * pred_x0


NOISES = ("philox", "keras")  # how a seed becomes the starting latent; "keras": before 2026-12
# Philox's second key word: the starting latent's stream, apart from anything else seeded with the
# same number (training's draws use their own generator and keys).
_START_STREAM = 0x5354415254  # "START"


def starting_noise(seeds, latent_shape) -> np.ndarray:
    """Each seed's starting latent, (len(seeds), *latent_shape) float32 standard normal, from
    NumPy's counter-based Philox keyed by (seed, stream): the same numbers on every Keras
    backend, and for a seed whatever else is in its batch."""
    return np.stack([
        np.random.Generator(np.random.Philox(key=np.array([int(s), _START_STREAM], np.uint64)))
        .standard_normal(tuple(latent_shape), dtype=np.float32) for s in seeds])


def denoise(unet, noise, contexts, steps: int = 50, guidance: float = 7.5, on_step=None):
    """The sampling loop: ``steps`` guided DDIM steps from ``noise`` to float32 clean latents.

    Args:
        unet: ``unet(latent, timestep_embedding, context)`` -> predicted noise, any float dtype.
        noise: (batch, H / 8, W / 8, 4) starting latents.
        contexts: (conditional, unconditional) text contexts, each (batch, 77, d) or (1, 77, d)
            for the whole batch; guidance steers towards the first, away from the second.
        on_step: ``on_step(done, total)`` after each step.
    """
    latent = ops.cast(noise, "float32")
    batch = ops.shape(latent)[0]
    context, unconditional = (_batched(c, batch) for c in contexts)
    visited = timesteps(steps)
    alpha, alpha_prev = alphas(visited)
    for done, i in enumerate(reversed(range(steps)), start=1):
        t_emb = timestep_embedding(np.full((batch,), visited[i]))
        eps_u = unet(latent, t_emb, unconditional)  # KerasCV's order: unconditional first
        eps_c = unet(latent, t_emb, context)
        latent = ddim_update(latent, guided_epsilon(eps_u, eps_c, guidance), alpha[i], alpha_prev[i])
        if on_step is not None:
            on_step(done, steps)
    return latent


# How decoded floats become uint8 pixels. "round": to the nearest level, as diffusers does
# (VaeImageProcessor: clamp to [0, 1], then numpy_to_pil's (x * 255).round()), and as real
# photos are read; "truncate": KerasCV's clip(...).astype("uint8"), which every image made before
# 2026-12-07 used; it makes images about half a grey level darker than their floats, a one-sided
# bias in every distance to real photos.
ROUNDINGS = ("round", "truncate")


def check_rounding(rounding: str) -> str:
    """``rounding`` if it is one of :data:`ROUNDINGS`, else a ValueError naming them."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding {rounding!r}: use one of {', '.join(ROUNDINGS)}")
    return rounding


def decode(decoder, latents, rounding: str = "round") -> np.ndarray:
    """uint8 images from ``decoder(latents)`` (in [-1, 1]), each float brought to [0, 255] in
    float32 and cut to an integer as ``rounding`` (:data:`ROUNDINGS`) says."""
    check_rounding(rounding)
    x = np.asarray(ops.convert_to_numpy(decoder(latents)), dtype=np.float32)
    if rounding == "truncate":
        return np.clip(((x + 1) / 2) * 255, 0, 255).astype("uint8")
    return np.round(np.clip(x / 2 + 0.5, 0, 1) * 255).astype("uint8")


def _batched(context, batch: int):
    """A (1, 77, d) context repeated for every image (KerasCV's ``_expand_tensor``)."""
    if ops.shape(context)[0] == 1 and batch > 1:
        return ops.repeat(context, batch, axis=0)
    return context
