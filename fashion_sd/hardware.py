"""What the machine offers, and the precision, XLA and distribution choices that follow from it."""

from __future__ import annotations

import os
import platform


def gpus():
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def compute_capability(gpu) -> tuple[int, int] | None:
    import tensorflow as tf

    details = tf.config.experimental.get_device_details(gpu)
    return details.get("compute_capability")


def resolve_precision(setting: str) -> str:
    """``auto``: bf16 on Ampere or newer (no loss scaling needed), fp16 with loss scaling on older
    GPUs (V100, T4), float32 on a CPU, where reduced precision is slower, not faster."""
    if setting != "auto":
        return setting
    found = gpus()
    if not found:
        return "float32"
    cc = compute_capability(found[0]) or (0, 0)
    return "mixed_bfloat16" if cc >= (8, 0) else "mixed_float16"


def resolve_jit(setting, replicas: int = 1, deterministic: bool = False) -> tuple[bool, str]:
    """Whether training uses XLA, and why (recorded in run.json).

    ``auto``: XLA on one GPU. Off on CPUs, where a LoRA step was measured 2.5x slower with it;
    off with several replicas, where the trainer's cross-replica skip (``merge_call`` + ``cond``)
    has not been proven compiled; off with ``train.deterministic``, under which Keras itself runs
    TensorFlow without XLA (op determinism is not supported by every XLA kernel).
    """
    if deterministic:
        return False, ("train.deterministic: Keras turns XLA off under TensorFlow op "
                       "determinism")
    if setting != "auto":
        return bool(setting), f"train.jit_compile: {str(bool(setting)).lower()}"
    if not gpus():
        return False, "auto: no GPU (on CPUs XLA made a LoRA step 2.5x slower)"
    if replicas > 1:
        return False, (f"auto: {replicas} replicas; the trainer's cross-replica skip of "
                       "non-finite steps uses merge_call, which TensorFlow forbids inside "
                       "XLA-compiled replica functions")
    return True, "auto: one GPU"


def strategy():
    """MirroredStrategy over every visible GPU when there are several, else the default."""
    import tensorflow as tf

    found = gpus()
    if len(found) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def describe() -> dict:
    """The machine, for run.json and benchmark headers."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
           "platform": platform.platform()}
    try:
        import tensorflow as tf

        out["gpus"] = [tf.config.experimental.get_device_details(g).get("device_name", g.name)
                       for g in gpus()]
    except Exception:  # noqa: BLE001 - a description must never fail a run
        out["gpus"] = []
    return out


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("fashion-sd", "tensorflow", "keras", "keras-cv", "numpy", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
