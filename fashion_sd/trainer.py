"""The training step: a ``keras.Model`` whose ``train_step`` is the algorithm, and its state.

Per step: draw a latent from the cached VAE posterior, noise it at a random timestep, let the
U-Net (LoRA enabled, all else frozen) predict the noise, minimise the MSE (Ho et al. 2020, the
"simple" loss with the epsilon target). AdamW with warm-up and cosine decay, global-norm
clipping and gradient accumulation are Keras' own optimizer features.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from fashion_sd import diffusion
from fashion_sd.files import atomic_path


def make_optimizer(learning_rate: float, total_steps: int, warmup_steps: int, weight_decay: float,
                   grad_clip: float | None, grad_accum: int, precision: str, replicas: int = 1):
    """AdamW on a warm-up + cosine schedule; loss scaling for float16.

    Steps count micro-batches: Keras evaluates the schedule at every call of ``apply``.
    With several replicas the gradients reach ``apply`` already averaged and divided by the
    replica count (see :meth:`LoraTrainer.train_step`), so the clipping threshold is divided too:
    ``clip(g / n, c / n) = clip(g, c) / n``, and Keras' cross-replica sum then gives ``clip(g, c)``.
    """
    decay_steps = max(1, total_steps - warmup_steps)
    if warmup_steps:
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps, warmup_target=learning_rate, warmup_steps=warmup_steps)
    else:
        schedule = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
    opt = keras.optimizers.AdamW(
        learning_rate=schedule, weight_decay=weight_decay,
        global_clipnorm=None if grad_clip is None else grad_clip / replicas,
        gradient_accumulation_steps=grad_accum if grad_accum > 1 else None)
    if precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


class LoraTrainer(keras.Model):
    """Wraps the U-Net; ``fit`` on dict batches: moments, context, vae_eps, noise, timesteps.

    A dict, because Keras reads a tuple as (x, y, sample_weight).
    """

    def __init__(self, unet: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.unet = unet
        self.alphas_cumprod = np.asarray(diffusion.alphas_cumprod(), np.float32)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        # Counters that survive epochs (Keras resets metrics each epoch); saved in the train state.
        self.skipped_steps = self.add_weight(shape=(), dtype="int64", initializer="zeros",
                                             trainable=False, name="skipped_steps",
                                             aggregation="only_first_replica")
        self.nonfinite_streak = self.add_weight(shape=(), dtype="int64", initializer="zeros",
                                                trainable=False, name="nonfinite_streak",
                                                aggregation="only_first_replica")

    @property
    def metrics(self):
        return [self.loss_tracker]

    def call(self, batch, training=False):
        """The U-Net's noise prediction for a batch: sample latents, add noise, predict it."""
        t = batch["timesteps"]
        latents = diffusion.sample_latents(batch["moments"], batch["vae_eps"])
        noisy = diffusion.add_noise(latents, batch["noise"], t, self.alphas_cumprod)
        pred = self.unet([noisy, diffusion.timestep_embedding(t), batch["context"]],
                         training=training)
        return ops.cast(pred, "float32")

    def _loss(self, batch, training: bool):
        return ops.mean(ops.square(self(batch, training=training) - batch["noise"]))

    def train_step(self, data):
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync if ctx is not None else 1
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            loss = self._loss(data, training=True)
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        if replicas > 1:
            # Average across replicas here so that every replica sees the same gradients (the
            # skip decision must agree) and clipping acts on the global gradient; Keras' own
            # apply() would clip each replica's share and then sum.
            grads = [g / replicas for g in ctx.all_reduce("mean", grads)]
            loss_all = ctx.all_reduce("mean", loss)
        else:
            loss_all = loss
        finite = tf.logical_and(tf.math.is_finite(loss_all),
                                tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads]))
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            # float16 overflow is routine: the loss-scale optimizer skips those steps itself.
            self.optimizer.apply(grads, variables)
            finite = tf.math.is_finite(loss_all)
        else:
            self._apply_if(finite, grads, variables, ctx, replicas)
        bad = tf.cast(tf.logical_not(finite), "int64")
        self.skipped_steps.assign_add(bad)
        self.nonfinite_streak.assign((self.nonfinite_streak + bad) * bad)
        self.loss_tracker.update_state(tf.where(finite, loss, 0.0), sample_weight=tf.cast(finite, "float32"))
        return {"loss": self.loss_tracker.result()}

    def _apply_if(self, finite, grads, variables, ctx, replicas):
        """Apply the update only for finite gradients: a real skip (no moments, no decay)."""
        if replicas == 1:
            tf.cond(finite, lambda: self.optimizer.apply(grads, variables) or tf.constant(True),
                    lambda: tf.constant(False))
            return

        # MirroredStrategy's apply() calls merge_call, which a replica-context cond cannot hold:
        # take the decision in cross-replica context (the pattern of Keras' LossScaleOptimizer).
        def cross(strategy, grads, finite):
            def apply():
                strategy.extended.call_for_each_replica(
                    lambda g: self.optimizer.apply(g, variables), args=(grads,))
                return tf.constant(True)

            # Every replica computed the same value from the all-reduced gradients.
            ok = strategy.experimental_local_results(finite)[0]
            return tf.cond(ok, apply, lambda: tf.constant(False))

        ctx.merge_call(cross, args=(grads, finite))

    def test_step(self, data):
        loss = self._loss(data, training=False)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}


# --------------------------------------------------------------------------------------------
# Train state: everything needed to continue a run bit for bit, in one atomic file.


def save_train_state(path: str | Path, trainer: LoraTrainer, lora_layers: dict, info: dict) -> Path:
    """LoRA matrices, optimizer variables and counters, plus ``info`` (step, epoch, ...) as JSON."""
    from safetensors.numpy import save_file

    from fashion_sd.lora import lora_state

    tensors = {f"lora/{k}": v for k, v in lora_state(lora_layers).items()}
    store: dict[str, np.ndarray] = {}
    trainer.optimizer.save_own_variables(store)
    tensors.update({f"optimizer/{k}": np.asarray(v) for k, v in store.items()})
    tensors["trainer/skipped_steps"] = np.asarray(trainer.skipped_steps.numpy())
    tensors["trainer/nonfinite_streak"] = np.asarray(trainer.nonfinite_streak.numpy())
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"info": json.dumps(info)})
    return Path(path)


def load_train_state(path: str | Path, trainer: LoraTrainer, lora_layers: dict) -> dict:
    """Restore what :func:`save_train_state` wrote; the optimizer must be built. Returns info."""
    from safetensors import safe_open

    with safe_open(str(path), "numpy") as fh:
        info = json.loads(fh.metadata()["info"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    for key, layer in lora_layers.items():
        layer.lora_kernel_a.assign(tensors[f"lora/{key}.lora_a"])
        layer.lora_kernel_b.assign(tensors[f"lora/{key}.lora_b"])
    store = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("optimizer/")}
    if len(store) != len(trainer.optimizer.variables):
        raise ValueError(f"{path}: the saved optimizer has {len(store)} variables, this one has "
                         f"{len(trainer.optimizer.variables)}: different LoRA targets, rank or "
                         "train.grad_accum/precision than the run that wrote it")
    trainer.optimizer.load_own_variables(store)
    trainer.skipped_steps.assign(tensors["trainer/skipped_steps"])
    trainer.nonfinite_streak.assign(tensors["trainer/nonfinite_streak"])
    return info
