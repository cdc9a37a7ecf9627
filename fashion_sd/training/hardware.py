"""What the machine offers, and the precision, XLA and distribution choices that follow from it."""

from __future__ import annotations

import glob
import json
import os
from importlib.metadata import PackageNotFoundError, version

import tensorflow as tf

from fashion_sd import host
from fashion_sd.errors import FashionSDError


def gpus():

    return tf.config.list_physical_devices("GPU")


def compute_capability(gpu) -> tuple[int, int] | None:

    details = tf.config.experimental.get_device_details(gpu)
    return details.get("compute_capability")


def resolve_precision(setting: str, tpu: bool = False) -> str:
    """``auto``: bf16 on a TPU and on Ampere or newer GPUs (no loss scaling needed), fp16 with
    loss scaling on older GPUs (V100, T4), float32 on a CPU, where reduced precision is slower."""
    if setting != "auto":
        return setting
    if tpu:
        return "mixed_bfloat16"
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


STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")


class StrategyError(FashionSDError, RuntimeError):
    """A train.strategy this machine cannot give (no TF_CONFIG, no TPU)."""


def tf_config() -> dict | None:
    """The cluster this process belongs to (``TF_CONFIG``), or None when it is not set."""
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        spec = json.loads(text)
        spec["cluster"], spec["task"]["type"], int(spec["task"]["index"])  # noqa: B018
    except (ValueError, KeyError, TypeError) as exc:
        raise StrategyError(
            f"TF_CONFIG is not a cluster spec ({exc}); set it to JSON such as "
            '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}} (README: "Several machines")') from None
    return spec


def tpu_address() -> str | None:
    """A TPU this process can reach: Colab's (``COLAB_TPU_ADDR``), a named one (``TPU_NAME``),
    or ``"local"`` on a TPU VM whose chips are devices of this host (``/dev/accel*``); else None."""
    if os.environ.get("TPU_NAME"):
        return os.environ["TPU_NAME"]
    if os.environ.get("COLAB_TPU_ADDR"):
        return "grpc://" + os.environ["COLAB_TPU_ADDR"]
    return "local" if glob.glob("/dev/accel*") else None


def resolve_strategy(setting: str) -> str:
    """``auto``: a TPU when one is found, mirrored with several GPUs, else one device. Several
    machines are never guessed: ``multi_worker`` is asked for by name (with ``TF_CONFIG``)."""
    if setting != "auto":
        return setting
    if tpu_address():
        return "tpu"
    return "mirrored" if len(gpus()) > 1 else "one_device"


def strategy(setting: str = "auto"):
    """The ``tf.distribute`` strategy that ``train.strategy`` names (see :func:`resolve_strategy`)."""

    kind = resolve_strategy(setting)
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    if kind == "multi_worker":
        spec = tf_config()
        if spec is None:
            raise StrategyError(
                "train.strategy: multi_worker needs TF_CONFIG, the cluster and this process's "
                'place in it, e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", '
                '"host2:12345"]}, "task": {"type": "worker", "index": 0}}\' on the first host '
                '(index 1 on the second); README: "Several machines"')
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "tpu":
        # Newer TPU VMs show their chips as VFIO devices, which GPU passthrough boxes have too:
        # taken as a TPU only when asked for by name, never guessed by auto.
        address = tpu_address() or ("local" if glob.glob("/dev/vfio/[0-9]*") else None)
        if address is None:
            raise StrategyError("train.strategy: tpu, but no TPU is reachable (no TPU_NAME, no "
                                "COLAB_TPU_ADDR, no TPU device); in Colab pick Runtime > Change "
                                "runtime type > TPU, or set train.strategy: auto")
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu="" if address == "local" else address)
        if address != "local":
            tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    return tf.distribute.get_strategy()


def describe() -> dict:
    """The machine, for run.json and benchmark headers."""
    out = host.describe()
    try:

        out["gpus"] = [tf.config.experimental.get_device_details(g).get("device_name", g.name)
                       for g in gpus()]
    except Exception:  # noqa: BLE001 - a description must never fail a run
        out["gpus"] = []
    return out


def versions() -> dict:

    out = {}
    for pkg in ("fashion-sd", "tensorflow", "keras", "keras-cv", "numpy", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
