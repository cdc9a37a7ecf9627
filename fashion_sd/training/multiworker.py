"""``fit`` for several machines: what ``keras.Model.fit`` does for our trainer, as a loop that
works under ``tf.distribute.MultiWorkerMirroredStrategy``.

Keras 3's ``fit`` cannot train under that strategy (keras-team/keras#20585, tensorflow#72388:
``ValueError: Attempt to convert a value ({'moments': PerReplica...``), so this loop is written
by hand, and only for that strategy; one machine keeps Keras' own ``fit``. It keeps fit's
contract with our callbacks (batch and epoch hooks, ``stop_training``, validation inside
``on_test_begin``/``on_test_end``, ``val_loss`` in the epoch logs), so the same callbacks drive
checkpoints, history, plots and samples.

Each worker runs the same loop on the same global batches; TensorFlow's DATA auto-sharding gives
each replica its slice of every batch, and the trainer's all-reduce makes every worker apply the
same update. Validation runs whole on the chief only (it writes what uses it), on local weights
outside the replicas, so no collective waits on the other workers.
"""

from __future__ import annotations

import keras
import tensorflow as tf

# What a collective raises when a peer stopped answering (TensorFlow's coordination service
# notices missing heartbeats and aborts every pending collective).
LOST_WORKER = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
               tf.errors.CancelledError, tf.errors.AbortedError)


def distribute(strategy, dataset: tf.data.Dataset):
    """``dataset``'s global batches, each split over the replicas of every worker."""
    options = tf.data.Options()
    # DATA: every worker reads the same batches and keeps its replicas' rows of each; FILE
    # sharding would need one input file per worker, and our batches come from one cache.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def validation_loss(trainer, dataset: tf.data.Dataset) -> float:
    """Mean of the per-batch val losses, as Keras' ``Mean`` metric averages them in ``evaluate``."""
    @tf.function
    def batch_loss(batch):
        return trainer._loss(batch, training=False)

    losses = [float(batch_loss(b)) for b in dataset]
    return sum(losses) / len(losses) if losses else float("nan")


def barrier(strategy) -> None:
    """Every worker waits here until all have arrived (an all-reduce of a zero): the others wait
    for the chief to finish writing, so no worker leaves the cluster while it still works."""
    tf.function(lambda: strategy.run(
        lambda: tf.distribute.get_replica_context().all_reduce("sum", tf.constant(0.0))))()


def fit(trainer, strategy, dataset, *, epochs: int, initial_epoch: int, steps_per_epoch: int,
        validation_data=None, callbacks=(), verbose: int = 1, chief: bool = True) -> None:
    """Train ``trainer`` over ``dataset`` as ``trainer.fit`` would, under ``strategy``.

    Every worker calls this with the same arguments; ``chief`` says whether this one validates
    (its callbacks are the ones that write).
    """
    @tf.function
    def train_step(batch):
        strategy.run(trainer.train_step, args=(batch,))

    batches = iter(distribute(strategy, dataset))
    hooks = keras.callbacks.CallbackList(list(callbacks), add_progbar=bool(verbose) and chief,
                                         model=trainer, verbose=verbose, epochs=epochs,
                                         steps=steps_per_epoch)
    trainer.stop_training = False
    hooks.on_train_begin()
    logs: dict = {}
    for epoch in range(initial_epoch, epochs):
        trainer.reset_metrics()
        hooks.on_epoch_begin(epoch)
        for step in range(steps_per_epoch):
            batch = next(batches, None)
            if batch is None:
                break
            hooks.on_train_batch_begin(step)
            train_step(batch)
            # The loss metric's variables are summed over replicas, so this is the global mean.
            logs = {"loss": float(trainer.loss_tracker.result())}
            hooks.on_train_batch_end(step, logs)
            if trainer.stop_training:
                break
        epoch_logs = dict(logs)
        if chief and validation_data is not None:
            hooks.on_test_begin()
            epoch_logs["val_loss"] = validation_loss(trainer, validation_data)
            hooks.on_test_end({"loss": epoch_logs["val_loss"]})
        hooks.on_epoch_end(epoch, epoch_logs)
        if trainer.stop_training:
            break
    hooks.on_train_end(logs)
