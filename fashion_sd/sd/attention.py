"""The U-Net's attention computed the fast way: fused attention and LoRA as a separate branch.

This module imports only ``keras`` (no TensorFlow, no keras_cv), so the same code runs under
Keras' JAX or torch backend on a machine without TensorFlow (the lent GPU machine has none).
:class:`fashion_sd.sd.unet.CrossAttention` computes its attention with
:func:`multi_head_attention` (or, as ``kerascv``, written out); :func:`use_lora_form` computes an
``enable_lora``'d ``Dense`` as a separate branch by replacing its ``call`` on the instance and
nothing else: the variables, their names, their order and every weights file stay exactly as
they were, so checkpoints, interop mappings and ``load_weights`` are untouched.

Why not Keras' ``Dense.enable_lora`` alone: it returns ``W + (alpha / r) A B`` from the
``kernel`` property, so autodiff forms the full weight gradient ``x^T dy`` of every frozen
projection each step (128 of them in the U-Net) and a new merged kernel per projection, only
to project that gradient onto A and B. ``x W + b + s (x A) B`` (PEFT's form, and the PyTorch
trainers') never touches a gradient of W. We still let ``enable_lora`` create A and B (its
initialisers, names and freezing of W are what checkpoints and interop expect); only the
forward computation is ours.
"""

from __future__ import annotations

import types

import keras
from keras import ops

ATTENTION = ("fused", "kerascv")
LORA_FORMS = ("separate", "merged")


# --------------------------------------------------------------------------------------------
# Pure functions


def lora_dense(x, kernel, a, b, scale: float, bias=None):
    """``x W + b + scale (x A) B``: the frozen projection plus the low-rank branch.

    Runs in ``x``'s dtype (the compute dtype); float32 A and B are cast to it, so their
    gradients come back float32 through the cast.
    """
    dtype = x.dtype
    y = ops.matmul(x, ops.cast(kernel, dtype))
    low = ops.matmul(ops.matmul(x, ops.cast(a, dtype)), ops.cast(b, dtype))
    y = y + ops.cast(scale, dtype) * low
    if bias is not None:
        y = y + ops.cast(bias, dtype)
    return y


def column_norm(kernel):
    """The L2 norm of each output channel of a Keras kernel (in, out): over axis 0, in float32.

    PEFT's DoRA takes ``torch.linalg.norm(W, dim=1)`` of torch's (out, in) weight: the same
    numbers, one per output channel. Float32 whatever the compute dtype: the ratio m / norm is
    near 1, and its difference from 1 is what DoRA learns.
    """
    w = ops.cast(kernel, "float32")
    return ops.sqrt(ops.sum(ops.square(w), axis=0))


def lora_kernel(kernel, a, b, scale: float):
    """``W + scale A B`` in float32: the kernel whose column norms DoRA divides by."""
    return ops.cast(kernel, "float32") + ops.cast(scale, "float32") * ops.matmul(
        ops.cast(a, "float32"), ops.cast(b, "float32"))


def dora_dense(x, kernel, a, b, scale: float, magnitude, bias=None, merged: bool = False):
    """DoRA (Liu et al. 2024) as PEFT's ``DoraLinearLayer`` computes it:
    ``m / ||W + s A B|| * (x W + s (x A) B) + b``, the norm per output channel and held constant
    in the gradient (PEFT's ``weight_norm.detach()``, the paper's section 4.3), so A and B get
    LoRA's gradient scaled by m / norm and m gets the gradient of that scale.

    ``merged``: ``x (m / norm * (W + s A B)) + b``, the same function through one merged kernel
    (Keras' ``enable_lora`` form). Either way ``W + s A B`` is formed for the norm, under
    ``stop_gradient``, so no weight gradient of W is taken in the separate form.
    """
    dtype = x.dtype
    full = lora_kernel(kernel, a, b, scale)
    factor = ops.cast(magnitude, "float32") / ops.stop_gradient(column_norm(full))
    if merged:
        y = ops.matmul(x, ops.cast(full * factor, dtype))
    else:
        y = lora_dense(x, kernel, a, b, scale) * ops.cast(factor, dtype)
    if bias is not None:
        y = y + ops.cast(bias, dtype)
    return y


def multi_head_attention(q, k, v, num_heads: int, head_size: int, scale: float):
    """softmax(q k^T * scale) v per head, for (batch, tokens, heads * head_size) inputs.

    ``keras.ops.dot_product_attention`` picks the backend's fused kernel where it has one
    (cuDNN / flash attention on GPUs, XLA's attention otherwise).
    """
    shape = lambda t: (-1, t.shape[1], num_heads, head_size)  # noqa: E731
    out = ops.dot_product_attention(ops.reshape(q, shape(q)), ops.reshape(k, shape(k)),
                                    ops.reshape(v, shape(v)), scale=scale)
    return ops.reshape(out, (-1, q.shape[1], num_heads * head_size))


# --------------------------------------------------------------------------------------------
# Swapping a layer's computation, keeping its weights


def _lora_branch_call(self, inputs, training=None):
    # ``_kernel`` is Dense's stored (frozen) kernel; ``self.kernel`` would be the merged one.
    x = lora_dense(inputs, self._kernel, self.lora_kernel_a, self.lora_kernel_b,
                   self.lora_alpha / self.lora_rank, self.bias)
    return x if self.activation is None else self.activation(x)


def _check_lora_dense(dense, form: str, what: str) -> None:
    """A float Dense with Keras' LoRA enabled, and a known form: what both computations need."""
    if form not in LORA_FORMS:
        raise ValueError(f"{what} form {form!r}: use one of {', '.join(LORA_FORMS)}")
    if not getattr(dense, "lora_enabled", False):
        raise ValueError(f"{dense.name}: enable LoRA on it first (Dense.enable_lora)")
    if getattr(dense, "quantization_mode", None):
        raise ValueError(f"{dense.name}: {what} is for float kernels, not quantized ones")


def use_lora_form(dense, form: str = "separate") -> None:
    """Compute an ``enable_lora``'d Dense as a separate branch (``separate``) or as Keras' merged
    kernel (``merged``)."""
    _check_lora_dense(dense, form, "LoRA")
    if form == "separate":
        dense.call = types.MethodType(_lora_branch_call, dense)
    else:
        dense.__dict__.pop("call", None)


def _dora_call(self, inputs, training=None):
    x = dora_dense(inputs, self._kernel, self.lora_kernel_a, self.lora_kernel_b,
                   self.lora_alpha / self.lora_rank, self.dora_magnitude, self.bias,
                   merged=self.dora_form == "merged")
    return x if self.activation is None else self.activation(x)


def enable_dora(dense, form: str = "separate") -> None:
    """Turn an ``enable_lora``'d Dense into DoRA: add its magnitude ``dora_magnitude`` (one
    trainable float32 number per output channel, starting at the column norms of
    ``W + s A B``, as PEFT starts it: W's norms while B is zero) and compute it as
    :func:`dora_dense` in ``form``.

    Keras has no DoRA; A and B stay ``enable_lora``'s (names, initialisers, float32, W frozen),
    only the magnitude and the forward computation are ours. The magnitude is added as
    ``enable_lora`` adds A and B (unlocking the built layer's tracker for it). It starts as
    the very norm the forward pass divides by, so enabling DoRA leaves the output as it was.
    """
    _check_lora_dense(dense, form, "DoRA")
    if hasattr(dense, "dora_magnitude"):
        raise ValueError(f"{dense.name}: DoRA is already enabled")
    dense._tracker.unlock()
    try:
        dense.dora_magnitude = dense.add_weight(
            name="dora_magnitude", shape=(int(dense._kernel.shape[1]),), initializer="ones",
            dtype="float32", autocast=False)
    finally:
        dense._tracker.lock()
    reset_dora_magnitude(dense)
    dense.dora_form = form
    dense.call = types.MethodType(_dora_call, dense)


def reset_dora_magnitude(dense) -> None:
    """Set the magnitude to the column norms of ``W + s A B`` now: the DoRA that computes
    exactly the plain LoRA of its A and B (at the start, and for a DoRA run started from a
    LoRA checkpoint)."""
    dense.dora_magnitude.assign(column_norm(lora_kernel(
        dense._kernel, dense.lora_kernel_a, dense.lora_kernel_b,
        dense.lora_alpha / dense.lora_rank)))


def is_dora(dense) -> bool:
    return hasattr(dense, "dora_magnitude")


def use_attention(layer, mode: str = "fused") -> None:
    """Compute a U-Net attention layer (:class:`fashion_sd.sd.unet.CrossAttention`) with
    ``keras.ops.dot_product_attention`` (``fused``) or the explicit softmax(q k^T) v
    (``kerascv``); its weights stay as they are."""
    if mode not in ATTENTION:
        raise ValueError(f"model.attention: {mode!r}: use one of {', '.join(ATTENTION)}")
    layer.attention = mode


def attention_layers(model: keras.Model) -> list:
    """Every attention layer of ``model`` (``CrossAttention``'s parts), in traversal order."""
    names = ("to_q", "to_k", "to_v", "out_proj", "num_heads", "head_size", "scale", "attention")
    return [layer for layer in model._flatten_layers(include_self=False)
            if all(hasattr(layer, n) for n in names)]


def set_attention(model: keras.Model, mode: str = "fused") -> int:
    """Apply :func:`use_attention` to every attention layer of ``model``; returns their number."""
    layers = attention_layers(model)
    for layer in layers:
        use_attention(layer, mode)
    return len(layers)
