"""The training step: a ``keras.Model`` whose ``train_step`` is the algorithm, and its state.

Per step: draw a latent from the cached VAE posterior, noise it at a random timestep, let the
U-Net (LoRA enabled, all else frozen) predict the noise, minimise the MSE (Ho et al. 2020, the
"simple" loss with the epsilon target). AdamW, global-norm clipping and gradient accumulation are
Keras' own optimizer features; the warm-up + cosine schedule counts optimizer steps; the EMA of
the weights is Keras' with diffusers' warm-up decay (:class:`EmaAdamW`). A step whose loss or
gradient is not finite, or whose gradient's squared norm overflows float32, is skipped and counted.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import keras
import numpy as np
from keras import ops
from safetensors import safe_open
from safetensors.numpy import save_file

from fashion_sd.config import TrainConfig
from fashion_sd.errors import BackendError
from fashion_sd.files import atomic_path
from fashion_sd.sd.lora import lora_state, set_lora_state
from fashion_sd.safetensors_file import safetensors_header
from fashion_sd.sd import diffusion


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``learning_rate`` over ``warmup_steps``, then cosine decay to 0 at
    ``total_steps``; all counted in optimizer steps.

    Written here rather than Keras' ``CosineDecay(warmup_target=...)`` for two reasons: Keras
    evaluates a schedule at micro-batch iterations (``optimizer._iterations``) even with gradient
    accumulation, so warm-up and ``train.max_steps`` would count different things; and its first
    warm-up step has learning rate 0, a wasted step. Here optimizer step ``k`` (0-based) warms up
    at ``learning_rate * (k + 1) / warmup_steps``.
    """

    def __init__(self, learning_rate: float, total_steps: int, warmup_steps: int = 0,
                 grad_accum: int = 1):
        self.learning_rate, self.total_steps = float(learning_rate), int(total_steps)
        self.warmup_steps, self.grad_accum = int(warmup_steps), int(grad_accum)

    def __call__(self, iteration):
        k = ops.cast(ops.floor_divide(ops.cast(iteration, "int64"), self.grad_accum), "float32")
        lr, w = self.learning_rate, float(self.warmup_steps)
        span = float(max(1, self.total_steps - self.warmup_steps))
        progress = ops.clip((k - w) / span, 0.0, 1.0)
        cosine = 0.5 * lr * (1.0 + ops.cos(np.pi * progress))
        if not self.warmup_steps:
            return cosine
        return ops.where(k < w, lr * (k + 1.0) / w, cosine)

    def get_config(self):
        return {"learning_rate": self.learning_rate, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "grad_accum": self.grad_accum}


def make_optimizer(train: TrainConfig, total_steps: int, precision: str, replicas: int = 1,
                   text_encoder_variables=()):
    """AdamW as ``train`` says (learning rate, warm-up, weight decay, clipping, accumulation) on a
    warm-up + cosine schedule over ``total_steps`` optimizer steps; loss scaling for float16.

    ``text_encoder_variables`` (the text encoder's LoRA) get their own AdamW at
    ``train.text_encoder_lr`` through Keras' ``MultiOptimizer``; each group is clipped on its own.

    With several replicas the gradients reach ``apply`` already averaged and divided by the
    replica count (see :meth:`LoraTrainer.train_step`), so the clipping threshold is divided too:
    ``clip(g / n, c / n) = clip(g, c) / n``, and Keras' cross-replica sum then gives ``clip(g, c)``.
    """
    def adamw(lr: float):
        return _adamw(train, lr, total_steps, replicas)

    if text_encoder_variables:
        te = {id(v) for v in text_encoder_variables}
        unet_opt, te_opt = adamw(train.learning_rate), adamw(train.text_encoder_lr or train.learning_rate)
        opt = keras.optimizers.MultiOptimizer(lambda v: te_opt if id(v) in te else unet_opt)
        opt.build_order = (unet_opt, te_opt)  # which is which, for learning_rate() below
    else:
        opt = adamw(train.learning_rate)
    if precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def _adamw(train: TrainConfig, learning_rate: float, total_steps: int, replicas: int):
    t = train
    return EmaAdamW(
        learning_rate=WarmupCosine(learning_rate, total_steps, t.warmup_steps, t.grad_accum),
        weight_decay=t.weight_decay,
        global_clipnorm=None if t.grad_clip is None else t.grad_clip / replicas,
        gradient_accumulation_steps=t.grad_accum if t.grad_accum > 1 else None,
        ema_decay=t.ema_decay, ema_grad_accum=t.grad_accum)


def ema_decay_at(step, decay: float):
    """The EMA decay of the average update after optimizer step ``step`` (0-based), as diffusers'
    ``EMAModel`` (``use_ema_warmup=False``, ``update_after_step=0``, ``min_decay=0``) uses at its
    ``step + 1``-th ``step()``: 0 at the first (the average becomes the weights), then
    ``min(decay, (1 + step) / (10 + step))``. Float32; ``step`` a tensor or a number.
    """
    k = ops.cast(step, "float32")
    warm = ops.minimum(ops.cast(decay, "float32"), (1.0 + k) / (10.0 + k))
    return ops.where(ops.equal(k, 0.0), ops.zeros_like(warm), warm)


class EmaAdamW(keras.optimizers.AdamW):
    """Keras' AdamW whose EMA of the weights (``ema_decay``; None: no EMA) is diffusers'
    ``EMAModel``: warm-up decay (:func:`ema_decay_at`), moved once per optimizer step, in
    EMAModel's form ``average -= (1 - decay) * (average - weight)``.

    Keras' own ``use_ema`` decays at a constant ``ema_momentum`` from the first step (after 300
    steps at 0.999 the average is still 74% the initial LoRA, i.e. the base model) and moves at
    every micro-batch under gradient accumulation. Only the per-step decay is ours: the averages
    stay Keras' optimizer variables (saved in the train state, so a resume stays exact) and the
    step counter is the optimizer's own iteration count.
    """

    def __init__(self, *args, ema_decay: float | None = None, ema_grad_accum: int = 1, **kwargs):
        kwargs.pop("use_ema", None), kwargs.pop("ema_momentum", None)
        super().__init__(*args, use_ema=ema_decay is not None,
                         ema_momentum=0.99 if ema_decay is None else ema_decay, **kwargs)
        self.ema_decay, self.ema_grad_accum = ema_decay, int(ema_grad_accum)

    def _update_model_variables_moving_average(self, trainable_variables):
        # Keras calls this after each micro-batch's update, before counting it in _iterations.
        if not self.use_ema:
            return
        micro = ops.cast(self._iterations, "int64")
        n = self.ema_grad_accum
        at_update = ops.equal(ops.mod(micro + 1, n), 0)  # the micro-batch that applies
        decay = ema_decay_at(ops.floor_divide(micro, n), self.ema_decay)
        # decay 1 between updates: average - 0 * (...) is the average, bit for bit
        one_minus = 1.0 - ops.where(at_update, decay, ops.ones_like(decay))
        for var, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                average.assign(ops.subtract(
                    average, ops.multiply(ops.cast(one_minus, average.dtype),
                                          ops.subtract(average, var))))

    def get_config(self):
        config = super().get_config()
        config.pop("use_ema", None), config.pop("ema_momentum", None)
        return {**config, "ema_decay": self.ema_decay, "ema_grad_accum": self.ema_grad_accum}


def _adams(optimizer) -> list:
    """The AdamW optimizers inside ``optimizer`` (under loss scaling, per variable group)."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    if isinstance(optimizer, keras.optimizers.MultiOptimizer):
        return list(optimizer.build_order)
    return [optimizer]


def learning_rate(optimizer) -> float:
    """The U-Net LoRA's learning rate now (the first group's)."""
    return float(keras.ops.convert_to_numpy(_adams(optimizer)[0].learning_rate))


def uses_ema(optimizer) -> bool:
    return any(getattr(o, "use_ema", False) for o in _adams(optimizer))


@contextlib.contextmanager
def ema_weights(optimizer, variables):
    """Within the block, ``variables`` hold the optimizer's EMA of them; their own values after.

    Keras keeps the averages but has no public swap (``finalize_variable_values`` overwrites for
    good), hence its private list. A no-op when the optimizer keeps no EMA.
    """
    if not uses_ema(optimizer):
        yield
        return
    averages = {}
    for opt in _adams(optimizer):
        for v in getattr(opt, "_trainable_variables", []):
            averages[id(v)] = opt._model_variables_moving_average[opt._get_variable_index(v)]
    saved = [v.numpy() for v in variables]
    for v in variables:
        v.assign(averages[id(v)])
    try:
        yield
    finally:
        for v, value in zip(variables, saved):
            v.assign(value)


def loss_scale(optimizer) -> float | None:
    """The float16 loss scale now, or None when the optimizer does not scale the loss."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return float(ops.convert_to_numpy(optimizer.dynamic_scale))
    return None


def step_verdict(loss, grads, scale=None):
    """Whether a step's update may be applied, and whether it was a float16 overflow.

    Backend-neutral (Keras ops), so TensorFlow's and JAX's steps judge alike. ``scale`` is the
    float16 loss scale (None without loss scaling); ``grads`` are the (scaled) gradients.

    Finite gradients can still overflow what the optimizer computes from them: the squared
    global norm of global-norm clipping (a gradient of about 2e19 makes it inf, and Keras' clip
    then multiplies by NaN) and Adam's g * g. Sum of squares of the (unscaled, global) gradient
    in float32, as Keras' clip computes it; not finite -> skipped like a NaN. Under loss scaling,
    overflowing scaled gradients are the loss-scale optimizer's business: it skips the step and
    halves the scale. A non-finite *unscaled* loss is not an overflow (no scale would help), so
    it is skipped here, the scale left alone, and counted; so is a finite scaled gradient whose
    unscaled norm overflows.
    """
    loss_ok = ops.isfinite(loss)
    grads_ok = ops.all(ops.stack([ops.all(ops.isfinite(g)) for g in grads]))
    unscale = 1.0 if scale is None else 1.0 / ops.cast(scale, "float32")
    sumsq = ops.sum(ops.stack([ops.sum(ops.square(ops.cast(g, "float32") * unscale))
                               for g in grads]))
    norm_ok = ops.isfinite(sumsq)
    if scale is None:
        return ops.logical_and(loss_ok, ops.logical_and(grads_ok, norm_ok)), ops.array(False)
    overflow = ops.logical_and(loss_ok, ops.logical_not(grads_ok))
    apply = ops.logical_and(loss_ok, ops.logical_or(ops.logical_not(grads_ok), norm_ok))
    return apply, overflow


def _backend_step():
    """The train step for the backend Keras runs on: the gradient and the conditional update are
    each backend's own (a tape and ``tf.cond``; ``jax.grad`` and a select); the loss and the
    verdict are written once, in :class:`LoraTrainer`."""
    backend = keras.backend.backend()
    # Imported here, at the backend boundary: each step imports its backend's library.
    if backend == "tensorflow":
        from fashion_sd.training.step_tf import TensorFlowStep
        return TensorFlowStep
    if backend == "jax":
        from fashion_sd.training.step_jax import JaxStep
        return JaxStep
    raise BackendError(f"KERAS_BACKEND={backend}: training runs on tensorflow or jax")


class LoraTrainer(_backend_step(), keras.Model):
    """Wraps the U-Net; ``fit`` on dict batches: moments, context, vae_eps, noise, timesteps.

    A dict, because Keras reads a tuple as (x, y, sample_weight). The trainer itself runs in
    float32 whatever the global policy (Keras would otherwise cast its float inputs to the
    compute dtype before ``call``): noising, timestep embedding and loss are float32, only the
    U-Net computes in bfloat16 or float16.

    The loss is Keras' ``compute_loss`` (:meth:`compute_loss`), which Keras' JAX trainer calls
    inside its stateless gradient and TensorFlow's step calls under its tape: one objective
    for every backend. A step whose loss or gradient is not finite is skipped and counted
    (:func:`step_verdict`, :meth:`record_step`).
    """

    def __init__(self, unet: keras.Model, snr_gamma: float | None = None,
                 text_encoder: keras.Model | None = None, mask_background: float | None = None,
                 mask_normalize: bool = False, **kwargs):
        super().__init__(dtype="float32", **kwargs)
        self.unet = unet
        # With lora.text_encoder, batches carry token ids and captions are encoded here.
        self.text_encoder = text_encoder
        self.snr_gamma = snr_gamma  # min-SNR weighting of the training loss (not of val loss)
        # train.mask_background_weight: the loss weight off the garment (None: no masks), and
        # train.mask_normalize; the training loss only, as min-SNR
        self.mask_background, self.mask_normalize = mask_background, mask_normalize
        self.alphas_cumprod = np.asarray(diffusion.alphas_cumprod(), np.float32)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        # Counters that survive epochs (Keras resets metrics each epoch); saved in the train state.
        # skipped_steps: steps with a non-finite (unscaled) loss or gradient, never applied;
        # overflow_steps: float16 steps whose scaled gradients overflowed (the loss-scale
        # optimizer skipped them and halved the scale); routine, so not part of the streak.
        counter = dict(shape=(), dtype="int64", initializer="zeros", trainable=False,
                       aggregation="only_first_replica")
        self.skipped_steps = self.add_weight(name="skipped_steps", **counter)
        self.overflow_steps = self.add_weight(name="overflow_steps", **counter)
        self.nonfinite_streak = self.add_weight(name="nonfinite_streak", **counter)

    @property
    def metrics(self):
        return [self.loss_tracker]

    def call(self, batch, training=False):
        """The U-Net's noise prediction for a batch, with what it is scored against.

        Returns float32 ``pred`` (the U-Net's output), ``target`` (the noise) and ``noisy``
        (x_t, the U-Net's latent input).
        """
        t = batch["timesteps"]
        if "tokens" in batch:
            tokens = ops.cast(batch["tokens"], "int32")
            positions = ops.broadcast_to(ops.arange(ops.shape(tokens)[1], dtype="int32")[None],
                                         ops.shape(tokens))
            context = ops.cast(self.text_encoder([tokens, positions], training=training), "float32")
        else:
            context = batch["context"]
        latents = diffusion.sample_latents(batch["moments"], batch["vae_eps"])
        target = ops.cast(batch["noise"], "float32")
        noisy = diffusion.add_noise(latents, target, t, self.alphas_cumprod)
        pred = self.unet([noisy, diffusion.timestep_embedding(t), context], training=training)
        return {"pred": ops.cast(pred, "float32"), "target": target, "noisy": noisy}

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The epsilon MSE of :meth:`call`'s output for batch ``x`` (``y`` is unused: the target
        is in the batch), in training min-SNR weighted when ``snr_gamma`` is set and weighted by
        the garment's mask (the batch's ``mask``) when ``mask_background`` is."""
        if y_pred is None:
            y_pred = self(x, training=training)
        weights = mask = None
        if training and self.snr_gamma:
            # Val loss stays the plain epsilon MSE, so runs with and without it compare.
            weights = diffusion.min_snr_weights(x["timesteps"], self.alphas_cumprod,
                                                self.snr_gamma)
        if training and self.mask_background is not None:
            mask = x["mask"]
        return diffusion.epsilon_loss(y_pred["pred"], y_pred["target"], weights, mask,
                                      self.mask_background or 0.0, self.mask_normalize)

    def _loss(self, batch, training: bool):
        return self.compute_loss(x=batch, y_pred=self(batch, training=training), training=training)

    def record_step(self, loss, applied, overflow):
        """Count a step (skips, overflows, the streak of skips) and track its loss if applied."""
        bad = ops.cast(ops.logical_not(applied), "int64")
        self.skipped_steps.assign_add(bad)
        self.overflow_steps.assign_add(ops.cast(overflow, "int64"))
        self.nonfinite_streak.assign((self.nonfinite_streak + bad) * bad)
        self.loss_tracker.update_state(ops.where(applied, loss, 0.0),
                                       sample_weight=ops.cast(applied, "float32"))
        return {"loss": self.loss_tracker.result()}


# --------------------------------------------------------------------------------------------
# Train state: everything needed to continue a run bit for bit, in one atomic file.


def save_train_state(path: str | Path, trainer: LoraTrainer, lora_layers: dict, info: dict) -> Path:
    """LoRA matrices, optimizer variables and counters, plus ``info`` (step, epoch, ...) as JSON."""

    tensors = {f"lora/{k}": v for k, v in lora_state(lora_layers).items()}
    store: dict[str, np.ndarray] = {}
    trainer.optimizer.save_own_variables(store)
    tensors.update({f"optimizer/{k}": np.asarray(v) for k, v in store.items()})
    tensors["trainer/skipped_steps"] = np.asarray(trainer.skipped_steps.numpy())
    tensors["trainer/overflow_steps"] = np.asarray(trainer.overflow_steps.numpy())
    tensors["trainer/nonfinite_streak"] = np.asarray(trainer.nonfinite_streak.numpy())
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"info": json.dumps(info)})
    return Path(path)


def load_train_state_step(path: str | Path) -> int | None:
    """The optimizer step a train state holds (its header only), or None when there is none."""

    try:
        info = json.loads(safetensors_header(path)[1]["info"])
        return int(info["optimizer_step"])
    except (OSError, ValueError, KeyError):
        return None


def load_train_state(path: str | Path, trainer: LoraTrainer, lora_layers: dict) -> dict:
    """Restore what :func:`save_train_state` wrote; the optimizer must be built. Returns info."""

    with safe_open(str(path), "numpy") as fh:
        info = json.loads(fh.metadata()["info"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    set_lora_state(lora_layers, tensors, prefix="lora/", name=str(path))  # DoRA's m too
    store = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("optimizer/")}
    if len(store) != len(trainer.optimizer.variables):
        raise ValueError(f"{path}: the saved optimizer has {len(store)} variables, this one has "
                         f"{len(trainer.optimizer.variables)}: different LoRA targets, rank, "
                         "train.grad_accum, train.ema_decay, lora.type or precision than the run that wrote it")
    trainer.optimizer.load_own_variables(store)
    trainer.skipped_steps.assign(tensors["trainer/skipped_steps"])
    # train states written before overflow counting began have no such counter
    trainer.overflow_steps.assign(tensors.get("trainer/overflow_steps", np.int64(0)))
    trainer.nonfinite_streak.assign(tensors["trainer/nonfinite_streak"])
    return info
