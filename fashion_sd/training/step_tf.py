"""TensorFlow's train step: the gradient under a tape, the update under ``tf.cond``, and
``tf.distribute``'s replicas (MirroredStrategy, MultiWorkerMirroredStrategy).

The loss and the verdict on a step are :class:`~fashion_sd.training.trainer.LoraTrainer`'s,
shared with JAX's step (:mod:`fashion_sd.training.step_jax`).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from fashion_sd.training import trainer as tr


class TensorFlowStep:
    """The mixin :class:`~fashion_sd.training.trainer.LoraTrainer` takes on TensorFlow."""

    def train_step(self, data):
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync if ctx is not None else 1
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x=data, y_pred=self(data, training=True), training=True)
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        if replicas > 1:
            # Average across replicas here so that every replica sees the same gradients (the
            # skip decision must agree) and clipping acts on the global gradient; Keras' own
            # apply() would clip each replica's share and then sum.
            mean = ctx.all_reduce("mean", grads)
            grads = [g / replicas for g in mean]
            loss_all = ctx.all_reduce("mean", loss)
        else:
            mean, loss_all = grads, loss
        lso = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        applied, overflow = tr.step_verdict(loss_all, mean,
                                            self.optimizer.dynamic_scale if lso else None)
        self._apply_if(applied, grads, variables, ctx, replicas)
        return self.record_step(loss, applied, overflow)

    def _apply_if(self, finite, grads, variables, ctx, replicas):
        """Apply the update only when ``finite``: a real skip (no moments, no decay)."""
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
