"""LoRA on the U-Net's attention projections: Keras' own ``Dense.enable_lora`` makes the matrices,
:mod:`fashion_sd.sd.attention` computes them as a separate low-rank branch (see there for why).

Each ``SpatialTransformer`` of the U-Net (:mod:`fashion_sd.sd.unet`, KerasCV's layout) holds a self-attention (``attn1``) and
a cross-attention (``attn2``) block, each with four ``Dense`` projections: ``to_q``, ``to_k``,
``to_v`` (no bias) and ``out_proj``. A projection is named ``st{i:02d}.attn{1,2}.{proj}`` with
``i`` the transformer's position in the model's (topological) layer order: stable across
processes, unlike Keras' auto-numbered layer names.

``lora.targets`` entries match names by suffix: ``to_q`` selects all 32 query projections,
``attn2.to_k`` only the cross-attention keys.

A checkpoint (``.lora.safetensors``) holds only the LoRA matrices plus metadata; about 3 MB at
rank 4. Keras' ``save_weights`` would instead write the whole merged model (3.4 GB).

A checkpoint imported from kohya or diffusers (``scripts/convert.py import-lora``) may also hold
text-encoder layers, ``te{i:02d}.{q_proj,k_proj,v_proj,out_proj,fc1,fc2}`` for the i-th layer of
KerasCV's ``TextEncoder``, and per-layer alphas (metadata ``layer_alpha``); generation and merging
apply those too, training does not train them.

DoRA (``lora.type: dora``, PEFT's ``use_dora``) is LoRA plus one magnitude per output channel
(:func:`fashion_sd.sd.attention.enable_dora`): the checkpoint then also holds
``<layer>.dora_m`` (out,) and says ``type: dora`` in its metadata; merging folds
``m * (W + s A B) / ||W + s A B||`` (per output channel) into the kernel.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import keras
import numpy as np

from fashion_sd.config import LoraConfig
from fashion_sd.sd import lora_file
from fashion_sd.sd.attention import enable_dora, is_dora, reset_dora_magnitude, use_lora_form
from fashion_sd.sd.lora_file import PROJECTIONS, LoraError, is_text_encoder_layer, layer_scale
from fashion_sd.sd.text_encoder import CLIPEncoderLayer
from fashion_sd.sd.unet import SpatialTransformer



def attention_projections(model: keras.Model) -> dict[str, keras.layers.Dense]:
    """Every attention projection of a model whose top-level layers include SpatialTransformers."""

    out = {}
    transformers = [layer for layer in model.layers if isinstance(layer, SpatialTransformer)]
    for i, st in enumerate(transformers):
        block = st.transformer_block
        for attn_name in ("attn1", "attn2"):
            attn = getattr(block, attn_name)
            for proj in PROJECTIONS:
                out[f"st{i:02d}.{attn_name}.{proj}"] = getattr(attn, proj)
    return out


def select(projections: dict[str, keras.layers.Dense], targets: Iterable[str]):
    """The projections whose names end with one of ``targets`` (matched at a dot boundary)."""
    targets = list(targets)
    lora_file.check_targets(projections, targets)
    return {k: v for k, v in projections.items() if any(lora_file.matches(k, t) for t in targets)}


def lora_parameter_count(layers: dict[str, keras.layers.Dense], rank: int,
                         dora: bool = False) -> int:
    """rank * (fan_in + fan_out) per projection: the size of A (in x r) plus B (r x out); with
    ``dora``, plus DoRA's magnitude (fan_out)."""
    return sum(rank * (int(d.kernel.shape[0]) + int(d.kernel.shape[1]))
               + (int(d.kernel.shape[1]) if dora else 0) for d in layers.values())


def lora_variables(layers: dict[str, keras.layers.Dense]) -> list:
    """Every trained variable of these layers, in checkpoint order: A, B (and DoRA's m) each."""
    return [v for layer in layers.values() for v in (
        layer.lora_kernel_a, layer.lora_kernel_b, *([layer.dora_magnitude] if is_dora(layer) else []))]


LORA_INITS = ("kaiming", "gaussian", "keras")


def a_initializer(init: str, rank: int):
    """The initializer of A (shape fan_in x rank) for ``lora.init``; B always starts at zero.

    - ``kaiming``: loralib's, PEFT's default (``init_lora_weights=True``) and kohya's,
      ``kaiming_uniform_(a=sqrt(5))``: uniform on +-1/sqrt(fan_in), std 1/sqrt(3 fan_in);
    - ``gaussian``: PEFT's and diffusers' ``init_lora_weights="gaussian"``, normal with std 1/rank;
    - ``keras``: Keras' ``enable_lora`` default, he_uniform: uniform on +-sqrt(6/fan_in), std
      sqrt(2/fan_in), sqrt(6) = 2.45x kaiming's.

    Unseeded, as Keras' own: ``keras.utils.set_random_seed`` makes the draw reproducible.
    """
    if init == "kaiming":
        # gain sqrt(2 / (1 + a^2)) = sqrt(1/3): variance 1 / (3 fan_in), bound sqrt(1 / fan_in)
        return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in",
                                                  distribution="uniform")
    if init == "gaussian":
        return keras.initializers.RandomNormal(mean=0.0, stddev=1.0 / rank)
    if init == "keras":
        return keras.initializers.HeUniform()
    raise LoraError(f"lora.init: {init!r}: use one of {', '.join(LORA_INITS)}")


def apply_lora(model: keras.Model, spec: LoraConfig):
    """Freeze ``model`` and train LoRA (A as ``spec.init`` says, B zero) on ``spec.targets``
    only, at ``spec.rank`` and ``spec.alpha`` (scale alpha / rank, as PEFT's lora_alpha / r).

    ``spec.form``: ``separate`` computes ``x W + s (x A) B`` (no weight gradient for the frozen
    W), ``merged`` Keras' ``x (W + s A B)``; the same variables and the same function.
    ``spec.type: dora`` adds DoRA's magnitude per layer (:func:`enable_dora`), in that form.
    Load base weights before this: Keras' legacy .h5 loading counts variables per layer.
    Returns the LoRA layers by name. Raises if anything else would train (checked by count).
    """

    layers = select(attention_projections(model), spec.targets)
    # Freezing variables rather than layers: a frozen parent layer would hide the LoRA
    # variables too, and `enable_lora` only freezes the kernel, not out_proj's bias.
    for v in model.trainable_weights:
        v.trainable = False
    for layer in layers.values():
        layer.enable_lora(spec.rank, lora_alpha=spec.alpha,
                          a_initializer=a_initializer(spec.init, spec.rank))
        if spec.type == "dora":
            enable_dora(layer, spec.form)
        else:
            use_lora_form(layer, spec.form)
    expected = lora_parameter_count(layers, spec.rank, dora=spec.type == "dora")
    got = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    if got != expected:  # would mean Keras changed what enable_lora freezes
        raise RuntimeError(f"{got} trainable parameters after enabling LoRA, expected {expected}")
    return layers


def lora_state(layers: dict[str, keras.layers.Dense]) -> dict[str, np.ndarray]:
    """``{layer}.lora_a``, ``.lora_b`` (and DoRA's ``.dora_m``) of every layer, as float32."""
    state = {}
    for key, layer in layers.items():
        state[f"{key}.lora_a"] = np.asarray(layer.lora_kernel_a.numpy(), np.float32)
        state[f"{key}.lora_b"] = np.asarray(layer.lora_kernel_b.numpy(), np.float32)
        if is_dora(layer):
            state[f"{key}.dora_m"] = np.asarray(layer.dora_magnitude.numpy(), np.float32)
    return state


def set_lora_state(layers: dict[str, keras.layers.Dense], tensors: dict[str, np.ndarray],
                   prefix: str = "", name: str = "LoRA", magnitude: bool = True) -> None:
    """Assign what :func:`lora_state` returned (keys under ``prefix``, e.g. a train state's
    ``lora/``) to ``layers``: every tensor checked against its variable's shape first, so a
    mismatch assigns nothing. ``magnitude=False``: A and B only (DoRA's m left as it is)."""
    pairs = []
    for key, layer in layers.items():
        variables = {"lora_a": layer.lora_kernel_a, "lora_b": layer.lora_kernel_b}
        if is_dora(layer) and magnitude:
            variables["dora_m"] = layer.dora_magnitude
        for suffix, var in variables.items():
            value = tensors.get(f"{prefix}{key}.{suffix}")
            if value is None:
                raise LoraError(f"{name}: {key}.{suffix} is missing"
                                + (" (a LoRA file for a DoRA model? set lora.type: lora)"
                                   if suffix == "dora_m" else ""))
            if tuple(value.shape) != tuple(var.shape):
                raise LoraError(f"{name}: {key}.{suffix} has shape {value.shape}, the model "
                                f"expects {tuple(var.shape)} (another base model?)")
            pairs.append((var, value))
    for var, value in pairs:
        var.assign(value)


def layers_type(layers: dict[str, keras.layers.Dense]) -> str:
    """``dora`` when every layer is DoRA, ``lora`` when none is (a mix is an error)."""
    kinds = {is_dora(layer) for layer in layers.values()}
    if len(kinds) > 1:
        raise LoraError("some LoRA layers are DoRA and some are not; use one lora.type")
    return "dora" if kinds == {True} else "lora"


def save_lora(path: str | Path, layers: dict[str, keras.layers.Dense], spec: LoraConfig,
              **metadata) -> Path:
    """Write the LoRA matrices and their metadata (``spec``'s rank, alpha, targets, type and
    ``metadata``) to a safetensors file, atomically. The type is the layers' own."""
    kind = layers_type(layers)
    if spec.type != kind:
        raise LoraError(f"lora.type is {spec.type}, the layers are {kind}")
    meta = {**spec.to_meta(), "layers": json.dumps(sorted(layers))}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    return lora_file.write(path, lora_state(layers), meta)


def load_lora(path: str | Path, layers: dict[str, keras.layers.Dense]) -> dict[str, str]:
    """Set the LoRA matrices of ``layers`` (LoRA enabled) from a checkpoint; returns its metadata.

    The checkpoint's rank, type (LoRA or DoRA) and layer set must equal the model's: a mismatch
    is an error that names both, never a partial load.
    """
    tensors, meta = lora_file.read(path, fits_model=False)
    spec = LoraConfig.from_meta(meta)
    kind = layers_type(layers)
    if spec.type != kind:
        raise LoraError(f"{path}: a {spec.type.upper()} checkpoint, the model's layers are "
                        f"{kind.upper()}; set lora.type: {spec.type}")
    _check_fits(path, spec, tensors, layers)
    set_lora_state(layers, tensors, name=str(path))
    return meta


def _check_fits(path, spec: LoraConfig, tensors: dict, layers: dict) -> None:
    """The checkpoint's rank and layer set are the model's, or a LoraError naming both."""
    rank, targets = spec.rank, spec.targets
    model_ranks = {layer.lora_rank for layer in layers.values()}
    if model_ranks != {rank}:
        raise LoraError(f"{path}: rank {rank}, but the model's LoRA has rank "
                        f"{', '.join(map(str, sorted(model_ranks)))}; set lora.rank: {rank}")
    file_layers = sorted({k.rsplit(".", 1)[0] for k in tensors})
    if file_layers != sorted(layers):
        extra = sorted(set(file_layers) - set(layers))
        missing = sorted(set(layers) - set(file_layers))
        raise LoraError(
            f"{path}: trained on targets {targets} ({len(file_layers)} layers), the model has "
            f"{len(layers)} LoRA layers; set lora.targets: {json.dumps(targets)}"
            + (f"; only in the file: {', '.join(extra[:4])}" if extra else "")
            + (f"; only in the model: {', '.join(missing[:4])}" if missing else ""))


TEXT_ENCODER_PROJECTIONS = {"q_proj": ("clip_attn", "q_proj"), "k_proj": ("clip_attn", "k_proj"),
                            "v_proj": ("clip_attn", "v_proj"), "out_proj": ("clip_attn", "out_proj"),
                            "fc1": (None, "fc1"), "fc2": (None, "fc2")}


def text_encoder_projections(text_encoder: keras.Model) -> dict[str, keras.layers.Dense]:
    """The Dense layers of the text encoder a LoRA may change, named ``te{i:02d}.{proj}``."""

    out = {}
    blocks = [layer for layer in text_encoder.layers if isinstance(layer, CLIPEncoderLayer)]
    for i, block in enumerate(blocks):  # each feeds the next, so this is their depth order
        for name, (parent, attr) in TEXT_ENCODER_PROJECTIONS.items():
            out[f"te{i:02d}.{name}"] = getattr(getattr(block, parent) if parent else block, attr)
    return out


TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def apply_text_encoder_lora(text_encoder: keras.Model, spec: LoraConfig):
    """Freeze the text encoder and train LoRA on its attention's q/k/v/out (``lora.text_encoder``),
    at ``spec``'s rank, alpha, init and type, as :func:`apply_lora` does for the U-Net. Returns the layers by
    name (``te{i:02d}.q_proj``, ...): the names imported LoRAs use, so checkpoints, merging, the
    app and export handle them as they are.

    Always Keras' merged form here: on TensorFlow's CPU runtime the separate branch inside the
    text encoder gave different bits from call to call with inter-op parallelism on, even under
    op determinism (measured; the merged form and a single inter-op thread did not), which
    would break exact resume; the text encoder's 48 small projections make the merged form's
    full weight gradient cheap.
    """

    layers = {k: v for k, v in text_encoder_projections(text_encoder).items()
              if k.split(".", 1)[1] in TEXT_ENCODER_TARGETS}
    for v in text_encoder.trainable_weights:
        v.trainable = False
    for layer in layers.values():
        layer.enable_lora(spec.rank, lora_alpha=spec.alpha,
                          a_initializer=a_initializer(spec.init, spec.rank))
        if spec.type == "dora":
            enable_dora(layer, "merged")
    expected = lora_parameter_count(layers, spec.rank, dora=spec.type == "dora")
    got = sum(int(np.prod(v.shape)) for v in text_encoder.trainable_weights)
    if got != expected:
        raise RuntimeError(f"{got} trainable text-encoder parameters, expected {expected}")
    return layers


def lora_deltas(path: str | Path, model: keras.Model, text_encoder: keras.Model | None = None):
    """The weight changes a LoRA checkpoint makes to ``model`` (LoRA not enabled), unapplied.

    Returns ``[(kernel variable, alpha / rank * A @ B)]`` and the checkpoint's metadata, after
    checking every layer and shape, so a caller can apply them at any strength and undo them.
    Text-encoder layers (imported LoRAs) change ``text_encoder``, which must then be given.
    A DoRA's change depends on the kernel (:func:`dora_delta`); it is taken from the base
    kernel, also while a :class:`LoraSwap` has changed it.
    """
    tensors, meta = lora_file.read(path, fits_model=False)
    keys = sorted({k.rsplit(".", 1)[0] for k in tensors})
    te_keys = [k for k in keys if is_text_encoder_layer(k)]
    if te_keys and text_encoder is None:
        raise LoraError(f"{path}: has {len(te_keys)} text-encoder layers ({te_keys[0]}, ...); pass "
                        "the text encoder too (text_encoder=...) so they are applied")
    projections = attention_projections(model)
    if te_keys:
        projections.update(text_encoder_projections(text_encoder))
    out = []
    for key in keys:
        if key not in projections:
            raise LoraError(f"{path}: layer {key} is not in this model")
        layer = projections[key]
        if layer.lora_enabled:
            raise LoraError("merging folds into plain kernels; build the model without LoRA")
        a, b = tensors[f"{key}.lora_a"], tensors[f"{key}.lora_b"]
        delta = layer_scale(meta, key, a.shape[1]) * (a.astype(np.float64) @ b)
        if delta.shape != tuple(layer.kernel.shape):
            raise LoraError(f"{path}: {key} is {delta.shape[0]}x{delta.shape[1]}, the model's "
                            f"kernel is {tuple(layer.kernel.shape)} (made for another base model?)")
        if f"{key}.dora_m" in tensors:
            delta = dora_delta(_base_value(layer.kernel), delta, tensors[f"{key}.dora_m"])
        out.append((layer.kernel, delta))
    return out, meta


def dora_delta(base: np.ndarray, lora_delta: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """``m * (W + D) / ||W + D|| - W`` in float64, the norm per output channel (axis 0 of a
    Keras kernel): what a DoRA adds to the kernel W whose LoRA change is D, so that it folds
    (:func:`folded`) as a LoRA does. At strength t the kernel is ``W + t * this``, as ComfyUI
    applies a DoRA at a strength."""
    full = base.astype(np.float64) + lora_delta
    return full * (magnitude.astype(np.float64) / np.linalg.norm(full, axis=0)) - base


def folded(base: np.ndarray, delta: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """``W + strength * delta``, summed in float64 and stored at ``W``'s own dtype: the one way a
    LoRA is folded into a kernel, whether for good (:func:`merge_lora`, ``convert merge``) or
    undoably (:class:`LoraSwap`: generation, evaluation, the app), so the two give the same
    kernels. (Training runs the LoRA as a separate branch instead: :mod:`fashion_sd.sd.attention`.)"""
    return (base.astype(np.float64) + strength * delta).astype(base.dtype)


def merge_lora(model: keras.Model, path: str | Path, strength: float = 1.0,
               text_encoder: keras.Model | None = None) -> dict[str, str]:
    """Fold a LoRA checkpoint into the base kernels of ``model`` (LoRA not enabled) for inference:
    ``W += strength * alpha / rank * A @ B``; text-encoder layers go into ``text_encoder``.
    Returns the checkpoint's metadata.
    """
    deltas, meta = lora_deltas(path, model, text_encoder=text_encoder)
    for kernel, delta in deltas:
        kernel.assign(folded(kernel.numpy(), delta, strength))
    return meta


def init_from(path: str | Path, layers: dict[str, keras.layers.Dense],
              spec: LoraConfig) -> dict[str, str]:
    """Start training from a LoRA checkpoint (``lora.init_from``): its A and B (and a DoRA's m)
    become the start. A DoRA run may start from a plain LoRA: its A and B, and m the column
    norms of ``W + s A B``, so it starts computing exactly that LoRA (as PEFT would start
    DoRA on those weights). A LoRA run cannot start from a DoRA (m has no LoRA form)."""
    meta = lora_file.check_init_from(path, spec.rank, spec.alpha, spec.type)
    kind = LoraConfig.from_meta(meta).type
    try:
        if kind == "lora" and layers_type(layers) == "dora":
            tensors, meta = lora_file.read(path, fits_model=False)
            _check_fits(path, LoraConfig.from_meta(meta), tensors, layers)
            set_lora_state(layers, tensors, name=str(path), magnitude=False)
            for layer in layers.values():
                reset_dora_magnitude(layer)
            return meta
        return load_lora(path, layers)
    except LoraError as exc:
        raise LoraError(f"lora.init_from: {exc}") from None


# The base value of every kernel a LoraSwap has changed now, by id(variable): a DoRA's change
# depends on the kernel it is folded into (dora_delta), and the app computes the next file's
# changes while the previous file is applied.
_SWAPPED: dict[int, tuple] = {}  # id -> (the variable, its base value)


def _base_value(var) -> np.ndarray:
    """A kernel's value without the LoRA a :class:`LoraSwap` may have folded into it."""
    entry = _SWAPPED.get(id(var))
    # the variable itself is kept and compared: an id may be reused by a later model's kernel
    return entry[1] if entry is not None and entry[0] is var else var.numpy()


class LoraSwap:
    """One LoRA at a time on plain kernels, at any strength, undone exactly.

    The app and the evaluator switch checkpoints and strengths on one loaded model; keeping the
    base value of every touched kernel makes each switch exact instead of accumulating rounding.
    """

    def __init__(self):
        self._base: dict[int, tuple] = {}

    def apply(self, deltas, strength: float = 1.0) -> None:
        self.reset()
        for var, delta in deltas:
            base = var.numpy()
            self._base[id(var)] = (var, base)
            _SWAPPED[id(var)] = (var, base)
            var.assign(folded(base, delta, strength))

    def reset(self) -> None:
        for key, (var, base) in self._base.items():
            var.assign(base)
            _SWAPPED.pop(key, None)
        self._base.clear()
