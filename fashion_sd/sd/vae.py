"""SD 1.x's VAE (AutoencoderKL) in Keras 3 ops: the encoder to 8 posterior channels and the decoder.

One implementation for every Keras backend (TensorFlow, JAX, torch): it imports only ``keras``.
The layers, their order and their attribute names are those of KerasCV 0.9's ``ImageEncoder``
and ``Decoder``, so KerasCV's published ``vae_encoder.h5`` / ``kcv_decoder.h5`` (matched by
layer order) and ``.weights.h5`` files written from KerasCV's classes (matched by class and
attribute names) load unchanged, and the interop's diffusers mapping walks the same structure.
Proven equal to KerasCV's networks in ``tests/sd/test_networks.py``.

Why not keras-hub's ``VAEBackbone``: it has SD's blocks but not the two 1x1 convolutions SD 1.x
has around the latent (``quant_conv``, ``post_quant_conv``), and it applies its own scale and
shift, so neither SD 1.x's weights nor KerasCV's files map onto it one to one.
"""

from __future__ import annotations

import keras
from keras import ops

from fashion_sd.sd.padded_conv import PaddedConv2D

LATENT_SCALE = 0.18215  # SD 1.x's latent scaling factor (diffusers' vae.config.scaling_factor)


class ResnetBlock(keras.layers.Layer):
    """GroupNorm-swish-conv twice plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, output_dim, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = output_dim
        self.norm1 = keras.layers.GroupNormalization(epsilon=1e-5)
        self.conv1 = PaddedConv2D(output_dim, 3, padding=1)
        self.norm2 = keras.layers.GroupNormalization(epsilon=1e-5)
        self.conv2 = PaddedConv2D(output_dim, 3, padding=1)

    def build(self, input_shape):
        # Created here, last, as KerasCV does: the variable order legacy .h5 files rely on.
        if input_shape[-1] != self.output_dim:
            self.residual_projection = PaddedConv2D(self.output_dim, 1)
        else:
            self.residual_projection = None

    def call(self, inputs):
        x = self.conv1(keras.activations.swish(self.norm1(inputs)))
        x = self.conv2(keras.activations.swish(self.norm2(x)))
        skip = inputs if self.residual_projection is None else self.residual_projection(inputs)
        return x + skip


class AttentionBlock(keras.layers.Layer):
    """Single-head self-attention over the pixels (1x1 convolutions as q, k, v, out)."""

    def __init__(self, output_dim, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = output_dim
        self.norm = keras.layers.GroupNormalization(epsilon=1e-5)
        self.q = PaddedConv2D(output_dim, 1)
        self.k = PaddedConv2D(output_dim, 1)
        self.v = PaddedConv2D(output_dim, 1)
        self.proj_out = PaddedConv2D(output_dim, 1)

    def call(self, inputs):
        x = self.norm(inputs)
        shape, c = ops.shape(inputs), self.output_dim  # the encoder takes any image size
        flat = lambda t: ops.reshape(t, (shape[0], -1, 1, c))  # noqa: E731  one head of width c
        out = ops.dot_product_attention(flat(self.q(x)), flat(self.k(x)), flat(self.v(x)),
                                        scale=float(c) ** -0.5)
        return self.proj_out(ops.reshape(out, shape)) + inputs


def _scaled_mean(x):
    return x[..., :4] * LATENT_SCALE


class ImageEncoder(keras.Sequential):
    """Images in [-1, 1] -> the posterior's scaled mean (4 channels); ``layers[-2]`` gives all 8
    moments (mean, log-variance), which training samples from."""

    def __init__(self, name=None):
        super().__init__([
            keras.layers.Input((None, None, 3)),
            PaddedConv2D(128, 3, padding=1),
            ResnetBlock(128),
            ResnetBlock(128),
            PaddedConv2D(128, 3, padding=((0, 1), (0, 1)), strides=2),
            ResnetBlock(256),
            ResnetBlock(256),
            PaddedConv2D(256, 3, padding=((0, 1), (0, 1)), strides=2),
            ResnetBlock(512),
            ResnetBlock(512),
            PaddedConv2D(512, 3, padding=((0, 1), (0, 1)), strides=2),
            ResnetBlock(512),
            ResnetBlock(512),
            ResnetBlock(512),
            AttentionBlock(512),
            ResnetBlock(512),
            keras.layers.GroupNormalization(epsilon=1e-5),
            keras.layers.Activation("swish"),
            PaddedConv2D(8, 3, padding=1),
            PaddedConv2D(8, 1),  # quant_conv
            keras.layers.Lambda(_scaled_mean),
        ], name=name)


class Decoder(keras.Sequential):
    """Scaled latents (img_height / 8, img_width / 8, 4) -> images in about [-1, 1]."""

    def __init__(self, img_height, img_width, name=None):
        super().__init__([
            keras.layers.Input((img_height // 8, img_width // 8, 4)),
            keras.layers.Rescaling(1.0 / LATENT_SCALE),
            PaddedConv2D(4, 1),  # post_quant_conv
            PaddedConv2D(512, 3, padding=1),
            ResnetBlock(512),
            AttentionBlock(512),
            ResnetBlock(512),
            ResnetBlock(512),
            ResnetBlock(512),
            ResnetBlock(512),
            keras.layers.UpSampling2D(2),
            PaddedConv2D(512, 3, padding=1),
            ResnetBlock(512),
            ResnetBlock(512),
            ResnetBlock(512),
            keras.layers.UpSampling2D(2),
            PaddedConv2D(512, 3, padding=1),
            ResnetBlock(256),
            ResnetBlock(256),
            ResnetBlock(256),
            keras.layers.UpSampling2D(2),
            PaddedConv2D(256, 3, padding=1),
            ResnetBlock(128),
            ResnetBlock(128),
            ResnetBlock(128),
            keras.layers.GroupNormalization(epsilon=1e-5),
            keras.layers.Activation("swish"),
            PaddedConv2D(3, 3, padding=1),
        ], name=name)
