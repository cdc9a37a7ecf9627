"""The numerics of denoising diffusion training, as small pure functions.

Everything matches what KerasCV's Stable Diffusion sampler does at inference, so a LoRA trained
here is trained for the sampler that will use it:

- the noise schedule is SD's "scaled linear" one (``_ALPHAS_CUMPROD`` in KerasCV's constants),
  not ``keras_cv...NoiseScheduler()``'s default linear 1e-4 -> 0.02, which does not match;
- the timestep embedding is the sampler's ``_get_timestep_embedding`` (cos first, then sin),
  vectorised over a batch of timesteps;
- latents are VAE posterior samples scaled by 0.18215, the factor KerasCV's ``ImageEncoder``
  applies to the posterior mean and its ``Decoder`` divides out.

All of it runs in float32 whatever the dtype policy: in bfloat16, alpha-bar(0) = 0.99915 rounds
to 1.0 and t = 0 and 1 would get no noise while the target is still the noise. Only the U-Net
runs in the compute dtype.
"""

from __future__ import annotations

import math

import numpy as np
from keras import ops

TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
LATENT_SCALE = 0.18215
EMBEDDING_DIM = 320


def alphas_cumprod(num_steps: int = TRAIN_TIMESTEPS, beta_start: float = BETA_START,
                   beta_end: float = BETA_END) -> np.ndarray:
    """:math:`\\bar\\alpha_t = \\prod_{s\\le t} (1-\\beta_s)`, betas linear in sqrt space (float64).

    Ho et al. 2020, eq. 4; the "scaled_linear" schedule of Stable Diffusion v1.
    """
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def timestep_embedding(timesteps, dim: int = EMBEDDING_DIM, max_period: float = 10000.0):
    """Sinusoidal embeddings, shape (batch, dim): ``[cos(t f), sin(t f)]``, ``f_i = P^(-i/half)``.

    Identical to KerasCV's ``StableDiffusion._get_timestep_embedding`` for each timestep, but for
    a whole batch of different timesteps at once (the sampler embeds one scalar at a time).
    """
    half = dim // 2
    freqs = ops.exp(-math.log(max_period) * ops.arange(0, half, dtype="float32") / half)
    args = ops.cast(ops.reshape(timesteps, (-1, 1)), "float32") * ops.expand_dims(freqs, 0)
    return ops.concatenate([ops.cos(args), ops.sin(args)], axis=-1)


def add_noise(latents, noise, timesteps, alphas_cumprod_table):
    """Sample :math:`x_t = \\sqrt{\\bar\\alpha_t} x_0 + \\sqrt{1-\\bar\\alpha_t}\\,\\epsilon`, in float32."""
    a = ops.take(ops.cast(alphas_cumprod_table, "float32"), ops.cast(timesteps, "int32"))
    a = ops.reshape(a, (-1, 1, 1, 1))
    return ops.sqrt(a) * ops.cast(latents, "float32") + ops.sqrt(1.0 - a) * ops.cast(noise, "float32")


def epsilon_loss(pred, noise, weights=None, mask=None, background: float = 0.0,
                 normalize: bool = False):
    """The "simple" loss of Ho et al. 2020: mean squared error to the noise, in float32.

    ``weights`` (one per sample) scale each sample's mean squared error before the batch mean,
    as diffusers' training scripts do for min-SNR weighting.

    ``mask`` (b, h, w, 1), 1 on the garment and 0 on the background at the latent grid, weighs
    each latent pixel by ``background + (1 - background) mask``: ``background`` 0 is kohya's
    ``--masked_loss`` (the error times the mask, then the mean over every pixel and channel),
    between 0 and 1 OneTrainer's "unmasked weight". ``normalize`` divides each sample's mean by
    its mean pixel weight (OneTrainer's "normalize masked area loss"), so a small garment
    weighs as much as a large one.
    """
    err = ops.square(ops.cast(pred, "float32") - ops.cast(noise, "float32"))
    if weights is None and mask is None:
        return ops.mean(err)
    n = ops.shape(err)[0]
    if mask is not None:
        w = background + (1.0 - background) * ops.cast(mask, "float32")
        err = err * w
        if normalize:  # each sample's weights average to 1 (an empty mask keeps weight 1)
            mean_w = ops.mean(ops.reshape(w, (n, -1)), axis=1)
            err = err / ops.reshape(ops.where(mean_w > 0, mean_w, 1.0), (n, 1, 1, 1))
    per_sample = ops.mean(ops.reshape(err, (n, -1)), axis=1)
    if weights is not None:
        per_sample = per_sample * ops.cast(weights, "float32")
    return ops.mean(per_sample)


def snr(timesteps, alphas_cumprod_table):
    """Signal-to-noise ratio of x_t: :math:`\bar\alpha_t / (1 - \bar\alpha_t)`, float32."""
    a = ops.take(ops.cast(alphas_cumprod_table, "float32"), ops.cast(timesteps, "int32"))
    return a / (1.0 - a)


def min_snr_weights(timesteps, alphas_cumprod_table, gamma: float):
    """Min-SNR-gamma weights for the epsilon target (Hang et al. 2023, eq. 9):
    min(SNR(t), gamma) / SNR(t), so low-noise timesteps, whose SNR is large, stop dominating
    the gradient."""
    s = snr(timesteps, alphas_cumprod_table)
    return ops.minimum(s, gamma) / s


def offset_noise(noise, offset: float, extra):
    """``noise + offset * extra``, ``extra`` one standard normal per sample and channel
    (shape (batch, 1, 1, channels)), broadcast over the pixels: the "noise offset" trick that lets
    a model learn overall brightness, e.g. the plain white backgrounds of product photos."""
    return ops.cast(noise, "float32") + offset * ops.cast(extra, "float32")


def sample_latents(moments, eps):
    """Draw a scaled latent from the VAE posterior given its 8-channel moments (mean, log-variance).

    ``eps`` is standard normal noise shaped like the mean; ``eps = 0`` gives KerasCV's
    ``ImageEncoder`` output (the mean, scaled). Log-variance is clipped to [-30, 20] as in the
    reference VAE (``DiagonalGaussianDistribution``) so exp() cannot overflow.
    """
    mean, logvar = ops.split(ops.cast(moments, "float32"), 2, axis=-1)
    eps = ops.cast(eps, "float32")
    logvar = ops.clip(logvar, -30.0, 20.0)
    return (mean + ops.exp(0.5 * logvar) * eps) * LATENT_SCALE
