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
