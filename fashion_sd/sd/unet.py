"""SD 1.x's U-Net (v1.4's UNet2DConditionModel) in Keras 3 ops, with the project's attention.

One implementation for every Keras backend (TensorFlow, JAX, torch): it imports only ``keras``
(no TensorFlow, no keras_cv), and no library has SD 1.x's U-Net to build on (keras-hub has SD3's
MMDiT, not this). The layers, their order and their attribute names are those of KerasCV 0.9's
``DiffusionModel``, so KerasCV's published ``kcv_diffusion_model.h5`` (matched by layer order),
``.weights.h5`` files written from KerasCV's classes (class and attribute names), the LoRA layer
names ``st{i:02d}.attn{1,2}.{proj}`` and the interop's diffusers mapping all stay as they were.
Proven equal to KerasCV's network in ``tests/sd/test_networks.py``.

What differs from KerasCV's code is how attention is computed, not what: each ``CrossAttention``
runs ``keras.ops.dot_product_attention`` (``attention="fused"``, the default: cuDNN flash
attention on GPUs that have it, XLA's elsewhere) or the explicit softmax(q k^T) v
(``"kerascv"``), chosen by an attribute rather than by replacing ``call`` on each instance.
"""

from __future__ import annotations

import keras
from keras import ops

from fashion_sd.sd.attention import ATTENTION, multi_head_attention
from fashion_sd.sd.padded_conv import PaddedConv2D

CONTEXT_WIDTH = 768  # CLIP ViT-L/14's hidden size: what SD 1.x cross-attends to
EMBEDDING_WIDTH = 320  # the sinusoidal timestep embedding's width


def explicit_attention(q, k, v, num_heads: int, head_size: int, scale: float):
    """softmax(q k^T * scale) v per head, written out (KerasCV's arithmetic, in einsums)."""
    split = lambda t: ops.reshape(t, (-1, t.shape[1], num_heads, head_size))  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = ops.softmax(ops.einsum("bqhd,bkhd->bhqk", q, k) * scale, axis=-1)
    out = ops.einsum("bhqk,bkhd->bqhd", weights, v)
    return ops.reshape(out, (-1, out.shape[1], num_heads * head_size))


class CrossAttention(keras.layers.Layer):
    """Multi-head attention of ``inputs`` over ``context`` (itself when None); q/k/v without bias.

    ``attention``: ``fused`` or ``kerascv`` (see the module docstring); settable after building,
    it changes the computation, never the weights.
    """

    def __init__(self, num_heads, head_size, attention: str = "fused", **kwargs):
        super().__init__(**kwargs)
        width = num_heads * head_size
        self.to_q = keras.layers.Dense(width, use_bias=False)
        self.to_k = keras.layers.Dense(width, use_bias=False)
        self.to_v = keras.layers.Dense(width, use_bias=False)
        self.scale = head_size**-0.5
        self.num_heads = num_heads
        self.head_size = head_size
        self.out_proj = keras.layers.Dense(width)
        self.attention = attention

    @property
    def attention(self) -> str:
        return self._attention

    @attention.setter
    def attention(self, mode: str) -> None:
        if mode not in ATTENTION:
            raise ValueError(f"model.attention: {mode!r}: use one of {', '.join(ATTENTION)}")
        self._attention = mode

    def call(self, inputs, context=None):
        if context is None:
            context = inputs
        q, k, v = self.to_q(inputs), self.to_k(context), self.to_v(context)
        attend = multi_head_attention if self._attention == "fused" else explicit_attention
        return self.out_proj(attend(q, k, v, self.num_heads, self.head_size, self.scale))


class GEGLU(keras.layers.Layer):
    """A gated GELU feed-forward input: half the projection gates the other half.

    The gate uses GELU's tanh approximation, as KerasCV does (diffusers uses the exact erf form;
    the two differ by under 1e-3 per activation, measured in the interop tests' tolerances).
    """

    def __init__(self, output_dim, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = output_dim
        self.dense = keras.layers.Dense(output_dim * 2)

    def call(self, inputs):
        x = self.dense(inputs)
        x, gate = x[..., : self.output_dim], x[..., self.output_dim:]
        return x * keras.activations.gelu(gate, approximate=True)


class BasicTransformerBlock(keras.layers.Layer):
    def __init__(self, dim, num_heads, head_size, attention: str = "fused", **kwargs):
        super().__init__(**kwargs)
        self.norm1 = keras.layers.LayerNormalization(epsilon=1e-5)
        self.attn1 = CrossAttention(num_heads, head_size, attention)
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-5)
        self.attn2 = CrossAttention(num_heads, head_size, attention)
        self.norm3 = keras.layers.LayerNormalization(epsilon=1e-5)
        self.geglu = GEGLU(dim * 4)
        self.dense = keras.layers.Dense(dim)

    def call(self, inputs):
        inputs, context = inputs
        x = self.attn1(self.norm1(inputs)) + inputs
        x = self.attn2(self.norm2(x), context=context) + x
        return self.dense(self.geglu(self.norm3(x))) + x


class SpatialTransformer(keras.layers.Layer):
    """GroupNorm, 1x1 conv in, a transformer block over the pixels as tokens, 1x1 conv out, plus
    the input."""

    def __init__(self, num_heads, head_size, fully_connected=False, attention: str = "fused",
                 **kwargs):
        super().__init__(**kwargs)
        channels = num_heads * head_size
        self.norm = keras.layers.GroupNormalization(epsilon=1e-5)
        self.proj1 = (keras.layers.Dense(channels) if fully_connected
                      else PaddedConv2D(channels, 1))
        self.transformer_block = BasicTransformerBlock(channels, num_heads, head_size, attention)
        self.proj2 = (keras.layers.Dense(channels) if fully_connected
                      else PaddedConv2D(channels, 1))

    def call(self, inputs):
        inputs, context = inputs
        _, h, w, c = inputs.shape
        x = ops.reshape(self.proj1(self.norm(inputs)), (-1, h * w, c))
        x = self.transformer_block([x, context])
        return self.proj2(ops.reshape(x, (-1, h, w, c))) + inputs


class ResBlock(keras.layers.Layer):
    """The U-Net's residual block: the timestep embedding is added between its two convolutions."""

    def __init__(self, output_dim, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = output_dim
        self.entry_flow = [
            keras.layers.GroupNormalization(epsilon=1e-5),
            keras.layers.Activation("swish"),
            PaddedConv2D(output_dim, 3, padding=1),
        ]
        self.embedding_flow = [
            keras.layers.Activation("swish"),
            keras.layers.Dense(output_dim),
        ]
        self.exit_flow = [
            keras.layers.GroupNormalization(epsilon=1e-5),
            keras.layers.Activation("swish"),
            PaddedConv2D(output_dim, 3, padding=1),
        ]

    def build(self, input_shape):
        # Created here, last, as KerasCV does: the variable order legacy .h5 files rely on.
        if input_shape[0][-1] != self.output_dim:
            self.residual_projection = PaddedConv2D(self.output_dim, 1)
        else:
            self.residual_projection = None

    def call(self, inputs):
        inputs, embeddings = inputs
        x = inputs
        for layer in self.entry_flow:
            x = layer(x)
        for layer in self.embedding_flow:
            embeddings = layer(embeddings)
        x = x + embeddings[:, None, None]
        for layer in self.exit_flow:
            x = layer(x)
        skip = inputs if self.residual_projection is None else self.residual_projection(inputs)
        return x + skip


class Upsample(keras.layers.Layer):
    def __init__(self, channels, **kwargs):
        super().__init__(**kwargs)
        self.ups = keras.layers.UpSampling2D(2)
        self.conv = PaddedConv2D(channels, 3, padding=1)

    def call(self, inputs):
        return self.conv(self.ups(inputs))


# (channels, heads, head size) of each resolution level; SD 1.x has 8 heads everywhere.
LEVELS = ((320, 8, 40), (640, 8, 80), (1280, 8, 160))


class DiffusionModel(keras.Model):
    """[latent (h/8, w/8, 4), timestep embedding (320,), context (77, 768)] -> predicted noise.

    ``img_height``/``img_width`` in pixels (multiples of 64: the latent is halved three times).
    """

    def __init__(self, img_height, img_width, max_text_length=77, attention: str = "fused",
                 name=None):
        context = keras.layers.Input((max_text_length, CONTEXT_WIDTH), name="context")
        t_embed_input = keras.layers.Input((EMBEDDING_WIDTH,), name="timestep_embedding")
        latent = keras.layers.Input((img_height // 8, img_width // 8, 4), name="latent")

        def transformer(heads, size):
            return SpatialTransformer(heads, size, fully_connected=False, attention=attention)

        t_emb = keras.layers.Dense(1280)(t_embed_input)
        t_emb = keras.layers.Activation("swish")(t_emb)
        t_emb = keras.layers.Dense(1280)(t_emb)

        # Down: two (ResBlock, transformer) pairs per level, then a stride-2 conv.
        skips = []
        x = PaddedConv2D(320, kernel_size=3, padding=1)(latent)
        skips.append(x)
        for channels, heads, size in LEVELS:
            for _ in range(2):
                x = ResBlock(channels)([x, t_emb])
                x = transformer(heads, size)([x, context])
                skips.append(x)
            x = PaddedConv2D(channels, 3, strides=2, padding=1)(x)
            skips.append(x)
        for _ in range(2):
            x = ResBlock(1280)([x, t_emb])
            skips.append(x)

        # Middle
        x = ResBlock(1280)([x, t_emb])
        x = transformer(8, 160)([x, context])
        x = ResBlock(1280)([x, t_emb])

        # Up: three ResBlocks per level, each on the matching skip, transformers below the
        # innermost level, an upsampling between levels.
        for _ in range(3):
            x = keras.layers.Concatenate()([x, skips.pop()])
            x = ResBlock(1280)([x, t_emb])
        x = Upsample(1280)(x)
        for i, (channels, heads, size) in enumerate(reversed(LEVELS)):
            for _ in range(3):
                x = keras.layers.Concatenate()([x, skips.pop()])
                x = ResBlock(channels)([x, t_emb])
                x = transformer(heads, size)([x, context])
            if i < len(LEVELS) - 1:
                x = Upsample(channels)(x)

        x = keras.layers.GroupNormalization(epsilon=1e-5)(x)
        x = keras.layers.Activation("swish")(x)
        output = PaddedConv2D(4, kernel_size=3, padding=1)(x)
        super().__init__([latent, t_embed_input, context], output, name=name)
