"""Precision, XLA and strategy choices from what the machine has."""

import pytest

from fashion_sd import hardware


@pytest.mark.parametrize("gpus, cc, expected", [
    ([], None, "float32"),
    (["gpu0"], (8, 0), "mixed_bfloat16"),   # A100
    (["gpu0"], (9, 0), "mixed_bfloat16"),   # H100
    (["gpu0"], (7, 0), "mixed_float16"),    # V100
    (["gpu0"], (7, 5), "mixed_float16"),    # T4
])
def test_auto_precision(monkeypatch, gpus, cc, expected):
    monkeypatch.setattr(hardware, "gpus", lambda: gpus)
    monkeypatch.setattr(hardware, "compute_capability", lambda g: cc)
    assert hardware.resolve_precision("auto") == expected
    assert hardware.resolve_precision("float32") == "float32"


def test_auto_jit(monkeypatch):
    monkeypatch.setattr(hardware, "gpus", lambda: [])
    assert hardware.resolve_jit("auto")[0] is False and hardware.resolve_jit(True)[0] is True
    monkeypatch.setattr(hardware, "gpus", lambda: ["gpu0"])
    assert hardware.resolve_jit("auto")[0] is True and hardware.resolve_jit(False)[0] is False
    # several GPUs: auto leaves XLA off and says why; an explicit true is honoured
    on, why = hardware.resolve_jit("auto", replicas=2)
    assert on is False and "2 replicas" in why
    assert hardware.resolve_jit(True, replicas=2)[0] is True
    # Keras runs op-deterministic TensorFlow without XLA: say so instead of claiming XLA
    on, why = hardware.resolve_jit("auto", deterministic=True)
    assert on is False and "deterministic" in why


def test_describe_and_versions():
    d = hardware.describe()
    assert d["cpu_count"] >= 1 and "gpus" in d
    assert hardware.versions()["keras-cv"] == "0.9.0"


def test_auto_strategy(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    monkeypatch.setattr(hardware.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(hardware, "gpus", lambda: [])
    assert hardware.resolve_strategy("auto") == "one_device"
    monkeypatch.setattr(hardware, "gpus", lambda: ["gpu0"])
    assert hardware.resolve_strategy("auto") == "one_device"
    monkeypatch.setattr(hardware, "gpus", lambda: ["gpu0", "gpu1"])
    assert hardware.resolve_strategy("auto") == "mirrored"
    monkeypatch.setenv("COLAB_TPU_ADDR", "10.0.0.2:8470")  # Colab's TPU runtime
    assert hardware.resolve_strategy("auto") == "tpu"
    assert hardware.tpu_address() == "grpc://10.0.0.2:8470"
    assert hardware.resolve_precision("auto", tpu=True) == "mixed_bfloat16"
    # several machines are never guessed, even with TF_CONFIG set
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1", "b:1"]}, '
                                    '"task": {"type": "worker", "index": 1}}')
    assert hardware.resolve_strategy("auto") == "tpu"
    assert hardware.resolve_strategy("multi_worker") == "multi_worker"


def test_tf_config_and_the_chief(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert hardware.tf_config() is None and hardware.is_chief(None)
    with pytest.raises(hardware.StrategyError, match="multi_worker needs TF_CONFIG"):
        hardware.strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(hardware.StrategyError, match="TF_CONFIG is not a cluster spec"):
        hardware.tf_config()
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1"]}}')  # no task
    with pytest.raises(hardware.StrategyError, match="TF_CONFIG is not a cluster spec"):
        hardware.tf_config()

    def spec(kind, index, chief=False):
        cluster = {"worker": ["a:1", "b:1"], **({"chief": ["c:1"]} if chief else {})}
        return {"cluster": cluster, "task": {"type": kind, "index": index}}

    assert hardware.is_chief(spec("worker", 0)) and not hardware.is_chief(spec("worker", 1))
    assert hardware.is_chief(spec("chief", 0, chief=True))
    assert not hardware.is_chief(spec("worker", 0, chief=True))  # TensorFlow's rule


def test_tpu_asked_for_without_one_says_how_to_get_one(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    monkeypatch.setattr(hardware.glob, "glob", lambda pattern: [])
    with pytest.raises(hardware.StrategyError, match="no TPU is reachable.*Change runtime type"):
        hardware.strategy("tpu")
