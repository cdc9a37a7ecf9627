"""Several devices on JAX: Keras' own ``DataParallel``, set once before any model is built.

Keras' JAX trainer does the rest: with a distribution set, ``fit`` places each batch split along
its first axis over the mesh (``jax.make_array_from_process_local_data``), the variables it
creates are replicated on every device, and the step is one ``jax.jit`` program that XLA
partitions (GSPMD). The loss is the global batch's mean, so the gradient, the skip verdict
(:func:`~fashion_sd.training.trainer.step_verdict`) and the update are the global ones, the same on
every device: no cross-replica loop of our own, and :mod:`~fashion_sd.training.step_jax` is
unchanged.

Several hosts: one process per host, each calling :func:`data_parallel` with the cluster
(``job_addresses``, ``num_processes``, ``process_id``, or Keras' environment variables
``KERAS_DISTRIBUTION_JOB_ADDRESSES``, ``KERAS_DISTRIBUTION_NUM_PROCESSES``,
``KERAS_DISTRIBUTION_PROCESS_ID``); Keras passes them to ``jax.distributed.initialize``, after
which the mesh holds every host's devices. Keras shards only a batched ``tf.data.Dataset`` of the
global batch across processes itself; numpy arrays are taken as each process's own part.

TensorFlow keeps ``tf.distribute`` (:mod:`~fashion_sd.training.hardware`): Keras'
TensorFlow distribution_lib is a prototype.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import keras

from fashion_sd.errors import BackendError
from fashion_sd.preflight import InputError

CLUSTER_ENV = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
               "KERAS_DISTRIBUTION_PROCESS_ID")


@dataclass(frozen=True)
class Parallelism:
    """What :func:`data_parallel` set: the devices the global batch is split over (``"cpu:0"``,
    ``"gpu:3"``, ...), the processes they belong to, and Keras' mesh (None: one device, nothing
    set)."""

    devices: tuple[str, ...]
    processes: int
    mesh: keras.distribution.DeviceMesh | None

    @property
    def device_count(self) -> int:
        return len(self.devices)

    def __str__(self) -> str:
        if self.mesh is None:
            return f"one device ({self.devices[0]}): no distribution"
        axes = ", ".join(f"{a}={n}" for a, n in zip(self.mesh.axis_names, self.mesh.shape))
        return (f"data parallel over {self.device_count} devices in {self.processes} "
                f"process(es), mesh ({axes})")


def data_parallel(batch_size: int, *, job_addresses: str | None = None,
                  num_processes: int | None = None,
                  process_id: int | None = None) -> Parallelism:
    """Split each batch of ``batch_size`` (``train.batch_size``, the global batch) over every
    device Keras' JAX backend sees, by setting ``keras.distribution.DataParallel``.

    Call it before any Keras model or variable exists (variables made before are on one device,
    and the jitted step then fails on "incompatible devices"). With one device it sets nothing.
    A cluster (the arguments or ``KERAS_DISTRIBUTION_*``) is joined first, through
    ``keras.distribution.initialize``, so the devices are every host's.

    Raises :class:`BackendError` on a backend other than JAX and :class:`InputError` when
    ``batch_size`` does not split evenly, both before anything is built.

    Example::

        parallelism = data_parallel(cfg.train.batch_size)
        print(parallelism)  # data parallel over 8 devices in 1 process(es), mesh (batch=8)
        unet = ...; trainer = LoraTrainer(unet); trainer.fit(...)
    """
    backend = keras.backend.backend()
    if backend != "jax":
        raise BackendError(
            f"KERAS_BACKEND={backend}: data_parallel sets Keras' distribution API, which "
            "trains on several devices on the jax backend; on tensorflow the run's "
            "tf.distribute strategy (train.strategy) splits the batch")
    if (job_addresses, num_processes, process_id) != (None, None, None) \
            or any(name in os.environ for name in CLUSTER_ENV):
        keras.distribution.initialize(job_addresses, num_processes, process_id)
    devices = tuple(keras.distribution.list_devices())
    if batch_size % len(devices):
        kind = devices[0].split(":")[0]
        raise InputError(
            f"train.batch_size={batch_size} (the global batch) must be a multiple of the "
            f"{len(devices)} {kind} devices it is split over; set train.batch_size to a "
            f"multiple of {len(devices)}")
    if len(devices) == 1:  # one device is one process
        return Parallelism(devices, 1, None)
    distribution = keras.distribution.DataParallel(devices=list(devices))
    keras.distribution.set_distribution(distribution)
    return Parallelism(devices, distribution.num_processes, distribution.device_mesh)
