"""Precision, XLA and strategy choices from what the machine has."""

import pytest

from fashion_sd.training import hardware


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


def test_tf_config_is_checked(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert hardware.tf_config() is None
    with pytest.raises(hardware.StrategyError, match="multi_worker needs TF_CONFIG"):
        hardware.strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(hardware.StrategyError, match="TF_CONFIG is not a cluster spec"):
        hardware.tf_config()
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["a:1"]}}')  # no task
    with pytest.raises(hardware.StrategyError, match="TF_CONFIG is not a cluster spec"):
        hardware.tf_config()


def test_tpu_asked_for_without_one_says_how_to_get_one(monkeypatch):
    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    monkeypatch.setattr(hardware.glob, "glob", lambda pattern: [])
    with pytest.raises(hardware.StrategyError, match="no TPU is reachable.*Change runtime type"):
        hardware.strategy("tpu")


def _tpu_cell() -> str:
    import json

    from conftest import ROOT

    nb = json.loads((ROOT / "notebooks/01_train_and_evaluate.ipynb").read_text())
    return next(src for c in nb["cells"] if "Colab TPU runtime" in (src := "".join(c["source"])))


def test_the_notebooks_tpu_cell_sets_up_a_tpu_run_and_train_builds_tpustrategy(monkeypatch):
    """Construction only (no TPU here): the cell's overrides, and the TensorFlow calls that
    train.py then makes, recorded."""
    import tensorflow as tf
    from conftest import ROOT

    from fashion_sd.config import load_config

    monkeypatch.delenv("TPU_NAME", raising=False)
    monkeypatch.setenv("COLAB_TPU_ADDR", "10.1.2.3:8470")
    ns = {"hardware": hardware, "IN_COLAB": False, "EXTRA": ["train.epochs=1"],
          "BUCKET": "gs://b/fashion"}
    exec(_tpu_cell(), ns)
    assert ns["EXTRA"] == ["train.epochs=1", "train.strategy=tpu",
                           "output.dir=gs://b/fashion/runs/tpu", "data.cache_dir=gs://b/fashion/cache"]
    cfg = load_config(ROOT / "configs/paper_best.yaml", ns["EXTRA"])
    assert (cfg.train.strategy, cfg.output.dir) == ("tpu", "gs://b/fashion/runs/tpu")

    calls = []

    class Resolver:
        def __init__(self, tpu):
            calls.append(("resolver", tpu))

    monkeypatch.setattr(tf.distribute.cluster_resolver, "TPUClusterResolver", Resolver)
    monkeypatch.setattr(tf.config, "experimental_connect_to_cluster", lambda r: calls.append("connect"))
    monkeypatch.setattr(tf.tpu.experimental, "initialize_tpu_system", lambda r: calls.append("init"))
    monkeypatch.setattr(tf.distribute, "TPUStrategy", lambda r: calls.append("strategy") or "tpu!")
    assert hardware.strategy(cfg.train.strategy) == "tpu!"
    assert calls == [("resolver", "grpc://10.1.2.3:8470"), "connect", "init", "strategy"]

    monkeypatch.delenv("COLAB_TPU_ADDR")
    monkeypatch.setattr(hardware.glob, "glob", lambda pattern: [])
    ns = {"hardware": hardware, "IN_COLAB": False, "EXTRA": [], "BUCKET": ""}
    exec(_tpu_cell(), ns)
    assert ns["EXTRA"] == []  # no TPU: the notebook runs as before
