"""What a training run gets on Keras' JAX backend: precision, devices, XLA, and which process
writes, in the shape :func:`fashion_sd.training.run.resolve_machine` returns for TensorFlow.

JAX always compiles the step with XLA (Keras jits every JAX train step); several devices are
Keras' ``DataParallel`` (:mod:`~fashion_sd.training.distribution`). What only TensorFlow has is
refused here, before any model: ``train.strategy: multi_worker`` and ``tpu`` are tf.distribute's
(several JAX hosts join through Keras' ``KERAS_DISTRIBUTION_*`` variables with ``auto``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import jax

from fashion_sd import host
from fashion_sd.errors import BackendError
from fashion_sd.training import distribution

TENSORFLOW_STRATEGIES = ("multi_worker", "tpu")


@dataclass
class Devices:
    """The stand-in for a tf.distribute strategy: the batch is split by Keras' distribution,
    variables are made where Keras puts them, and process 0 writes."""

    replicas: int

    @property
    def num_replicas_in_sync(self) -> int:
        return self.replicas

    def scope(self):
        return contextlib.nullcontext()


def precision(setting: str) -> str:
    """``auto``: bfloat16 on a TPU and on Ampere or newer GPUs, float16 with loss scaling on
    older GPUs, float32 on a CPU (as on TensorFlow)."""
    device = jax.devices()[0]
    if setting == "mixed_float16" and device.platform == "cpu":
        raise BackendError("train.precision: mixed_float16 on JAX's CPU backend: its matmuls "
                           "have no float16 inputs with float32 accumulation (XLA refuses "
                           "F16_F16_F32 on CPU); use float32 or mixed_bfloat16 on a CPU "
                           "(float16 with loss scaling is for GPUs older than Ampere)")
    if setting != "auto":
        return setting
    if device.platform == "tpu":
        return "mixed_bfloat16"
    if device.platform != "gpu":
        return "float32"
    major = int(str(getattr(device, "compute_capability", "8.0")).split(".")[0])
    return "mixed_bfloat16" if major >= 8 else "mixed_float16"


def resolve(strategy: str, precision_setting: str, jit_setting, batch_size: int):
    """(precision, Devices, jit, jit_reason, kind, processes, chief) for this machine."""
    if strategy in TENSORFLOW_STRATEGIES:
        raise BackendError(f"train.strategy: {strategy} is TensorFlow's tf.distribute; run it with "
                           "KERAS_BACKEND=tensorflow, or on JAX use train.strategy: auto (all "
                           "local devices; several hosts through KERAS_DISTRIBUTION_* variables)")
    if jit_setting is False:
        raise BackendError("train.jit_compile: false: Keras compiles every JAX train step with "
                           "XLA; set it to auto or true, or run with KERAS_BACKEND=tensorflow")
    parallel = (distribution.data_parallel(batch_size) if strategy in ("auto", "mirrored")
                else None)
    replicas = parallel.device_count if parallel else 1
    kind = "data_parallel" if replicas > 1 else "one_device"
    return (precision(precision_setting), Devices(replicas), True,
            "jax: Keras compiles every JAX train step with XLA", kind,
            parallel.processes if parallel else 1, jax.process_index() == 0)


def describe() -> dict:
    """The machine, for run.json: CPU, CPU count, the accelerators JAX sees, Python."""
    return {**host.describe(), "gpus": [d.device_kind for d in jax.devices()
                                        if d.platform != "cpu"]}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("fashion-sd", "jax", "jaxlib", "keras", "numpy", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
