"""JAX's train step: Keras' stateless gradient of the shared loss, the update kept or dropped by
a select, the counters and the loss tracker updated in a ``StatelessScope``.

It follows Keras' own ``JAXTrainer.train_step`` (``compute_loss_and_updates`` under
``jax.value_and_grad``, then ``optimizer.stateless_apply``), adding only the verdict: Keras has
no way to skip a step whose loss or gradient is not finite. A skipped step leaves the weights
and every optimizer variable (moments, iteration count, EMA) as they were, as TensorFlow's
``tf.cond`` does. The loss and the verdict are :class:`~fashion_sd.training.trainer.LoraTrainer`'s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
from keras.src import backend

from fashion_sd.training import trainer as tr


def _values(variables, scope, defaults):
    """Each variable's value after a ``StatelessScope``: updated if it was, else its default."""
    out = []
    for var, default in zip(variables, defaults):
        value = scope.get_current_value(var)
        out.append(default if value is None else value)
    return out


class JaxStep:
    """The mixin :class:`~fashion_sd.training.trainer.LoraTrainer` takes on JAX."""

    def train_step(self, state, data):
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)
        (_, aux), grads = grad_fn(trainable, non_trainable, metrics_vars, data, None, None,
                                  training=True, optimizer_variables=optimizer_vars)
        loss, _, non_trainable, metrics_vars = aux

        scale = None
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            mapping = list(zip(self.optimizer.variables, optimizer_vars))
            with backend.StatelessScope(state_mapping=mapping):
                scale = jnp.asarray(self.optimizer.dynamic_scale.value)
        applied, overflow = tr.step_verdict(loss, grads, scale)

        new_trainable, new_optimizer_vars = self.optimizer.stateless_apply(
            optimizer_vars, grads, trainable)
        keep = lambda new, old: jnp.where(applied, new, old)  # noqa: E731
        trainable = [keep(n, o) for n, o in zip(new_trainable, trainable)]
        optimizer_vars = [keep(n, o) for n, o in zip(new_optimizer_vars, optimizer_vars)]

        tracked = self.non_trainable_variables + self.metrics_variables
        with backend.StatelessScope(
                state_mapping=list(zip(tracked, non_trainable + metrics_vars))) as scope:
            logs = self.record_step(loss, applied, overflow)
        non_trainable = _values(self.non_trainable_variables, scope, non_trainable)
        metrics_vars = _values(self.metrics_variables, scope, metrics_vars)
        return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)

    def test_step(self, state, data):
        trainable, non_trainable, metrics_vars = state
        loss, _ = self.compute_loss_and_updates(trainable, non_trainable, metrics_vars, data,
                                                None, None, training=False)
        with backend.StatelessScope(
                state_mapping=list(zip(self.metrics_variables, metrics_vars))) as scope:
            self.loss_tracker.update_state(loss)
            logs = {"loss": self.loss_tracker.result()}
        return logs, (trainable, non_trainable,
                      _values(self.metrics_variables, scope, metrics_vars))
