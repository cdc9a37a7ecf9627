"""SD 1.x's text encoder, OpenAI CLIP ViT-L/14's text transformer, in Keras 3 ops.

One implementation for every Keras backend: it imports only ``keras``. The layers, their order
and attribute names are KerasCV 0.9's ``TextEncoder`` (so ``kcv_encoder.h5``, ``.weights.h5``
files from KerasCV's classes, the text-encoder LoRA names ``te{i:02d}.{proj}`` and the interop's
transformers mapping stay as they were); it returns the last hidden state after the final layer
norm, what SD 1.x cross-attends to. Proven equal to KerasCV's network in
``tests/sd/test_networks.py``.

Why not keras-hub's ``CLIPTextEncoder``: its final layer norm uses epsilon 1e-6 where OpenAI's
(and these weights') is 1e-5, and its layer structure is not KerasCV's, so every existing file
and mapping would need a second converter; the attention here is causal as OpenAI's is,
computed by ``keras.ops.dot_product_attention``.
"""

from __future__ import annotations

import keras
from keras import ops

WIDTH, HEADS, LAYERS, VOCAB = 768, 12, 12, 49408


def quick_gelu(x):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * ops.sigmoid(x * 1.702)


class CLIPEmbedding(keras.layers.Layer):
    def __init__(self, input_dim=VOCAB, output_dim=WIDTH, max_length=77, **kwargs):
        super().__init__(**kwargs)
        self.token_embedding = keras.layers.Embedding(input_dim, output_dim)
        self.position_embedding = keras.layers.Embedding(max_length, output_dim)

    def call(self, inputs):
        tokens, positions = inputs
        return self.token_embedding(tokens) + self.position_embedding(positions)


class CLIPAttention(keras.layers.Layer):
    """Causal multi-head self-attention: a token sees itself and the tokens before it."""

    def __init__(self, embed_dim=WIDTH, num_heads=HEADS, causal=True, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.causal = causal
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = keras.layers.Dense(embed_dim)
        self.k_proj = keras.layers.Dense(embed_dim)
        self.v_proj = keras.layers.Dense(embed_dim)
        self.out_proj = keras.layers.Dense(embed_dim)

    def call(self, inputs):
        length = inputs.shape[1]
        heads = lambda t: ops.reshape(t, (-1, length, self.num_heads, self.head_dim))  # noqa: E731
        out = ops.dot_product_attention(heads(self.q_proj(inputs)), heads(self.k_proj(inputs)),
                                        heads(self.v_proj(inputs)), scale=self.scale,
                                        is_causal=self.causal)
        return self.out_proj(ops.reshape(out, (-1, length, self.embed_dim)))


class CLIPEncoderLayer(keras.layers.Layer):
    """A pre-norm transformer block: attention, then a quick-GELU MLP, each with a residual."""

    def __init__(self, embed_dim, num_heads, activation=quick_gelu, **kwargs):
        super().__init__(**kwargs)
        self.layer_norm1 = keras.layers.LayerNormalization(epsilon=1e-5)
        self.clip_attn = CLIPAttention(embed_dim, num_heads, causal=True)
        self.layer_norm2 = keras.layers.LayerNormalization(epsilon=1e-5)
        self.fc1 = keras.layers.Dense(embed_dim * 4)
        self.fc2 = keras.layers.Dense(embed_dim)
        self.activation = activation

    def call(self, inputs):
        x = inputs + self.clip_attn(self.layer_norm1(inputs))
        return x + self.fc2(self.activation(self.fc1(self.layer_norm2(x))))


class TextEncoder(keras.Model):
    """[tokens (77,) int32, positions (77,) int32] -> contexts (77, 768)."""

    def __init__(self, max_length=77, vocab_size=VOCAB, name=None):
        tokens = keras.layers.Input(shape=(max_length,), dtype="int32", name="tokens")
        positions = keras.layers.Input(shape=(max_length,), dtype="int32", name="positions")
        x = CLIPEmbedding(vocab_size, WIDTH, max_length)([tokens, positions])
        for _ in range(LAYERS):
            x = CLIPEncoderLayer(WIDTH, HEADS, activation=quick_gelu)(x)
        embedded = keras.layers.LayerNormalization(epsilon=1e-5)(x)
        super().__init__([tokens, positions], embedded, name=name)
