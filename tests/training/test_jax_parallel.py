"""Several devices on JAX through Keras' DataParallel (fashion_sd.training.distribution): the tiny
training run of step_case on two CPU devices (XLA's forced host device count) equals the same
run on one, skips a non-finite batch on both devices alike, and a batch that does not split is
refused before any model."""

import json
import socket

import keras
import numpy as np
import pytest
from backends import run_on_jax, run_on_jax_allowing_failure
from conftest import ROOT
from step_case import assert_same_training, make_case

from fashion_sd.errors import BackendError
from fashion_sd.sd import lora_file
from fashion_sd.training import distribution

CASE = ROOT / "tests" / "parallel_case.py"
TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def one_process_cluster() -> dict:
    """Keras' cluster variables for a cluster of this one process: the path several hosts take
    (``keras.distribution.initialize`` -> ``jax.distributed.initialize``), as far as one process
    can follow it."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    return {"KERAS_DISTRIBUTION_JOB_ADDRESSES": f"localhost:{port}",
            "KERAS_DISTRIBUTION_NUM_PROCESSES": "1", "KERAS_DISTRIBUTION_PROCESS_ID": "0"}


def lora_matrices(path):
    return lora_file.read(path, fits_model=False)[0]


def result(folder, devices: int) -> dict:
    return json.loads((folder / f"devices-{devices}" / "jax.json").read_text())


@pytest.mark.parametrize("nan_batch", [None, 1])
def test_two_devices_train_as_one(tmp_path, nan_batch):
    make_case(tmp_path, batches=4, nan_batch=nan_batch)
    run_on_jax(CASE, tmp_path)
    # The clean run also joins a (one-process) cluster as several hosts would.
    cluster = one_process_cluster() if nan_batch is None else {}
    run_on_jax(CASE, tmp_path, env={**TWO_DEVICES, **cluster})
    one, two = result(tmp_path, 1), result(tmp_path, 2)

    assert one["mesh_shape"] is None and one["step_saw"]["noise"]["devices"] == 1
    assert two["jax_device_count"] == 2 and two["mesh_shape"] == [2]
    assert two["jax_distributed"] == bool(cluster) and two["processes"] == 1
    # Keras split each batch of 2 over the devices, one row each, and replicated the LoRA.
    assert two["step_saw"]["noise"]["devices"] == 2
    assert two["step_saw"]["noise"]["shard_shape"] == [1, 8, 8, 4]
    assert two["step_saw"]["lora_a"]["devices"] == 2
    assert two["step_saw"]["lora_a"]["shard_shape"] == one["step_saw"]["lora_a"]["shard_shape"]
    assert two["trainable_devices"] == [2]
    # A NaN in the first row of batch 1 is on device 0 only; the verdict is the global batch's,
    # so both devices skip it and their copies stay equal.
    skipped = 0 if nan_batch is None else 1
    assert one["skipped"] == two["skipped"] == skipped
    assert one["optimizer_steps"] == two["optimizer_steps"] == 4 - skipped
    assert two["replica_spread"] == 0.0
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)

    start = lora_matrices(tmp_path / "start.lora.safetensors")
    want = lora_matrices(tmp_path / "devices-1" / "jax.lora.safetensors")
    got = lora_matrices(tmp_path / "devices-2" / "jax.lora.safetensors")
    ema_one = np.load(tmp_path / "devices-1" / "jax.ema.npz")
    ema_two = np.load(tmp_path / "devices-2" / "jax.ema.npz")
    # measured: norm 3.0e-5 and 4.3e-5 with the NaN batch, element by element 1.7e-4 and 2.3e-4
    # of the largest update, the EMA alike; the losses to 1e-7
    assert_same_training(start, want, got, ema_one, ema_two)


def test_a_batch_that_does_not_split_is_refused_before_any_model(tmp_path):
    out = run_on_jax_allowing_failure(CASE, tmp_path, 3, env=TWO_DEVICES)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "train.batch_size=3" in out.stderr and "multiple of the 2 cpu devices" in out.stderr
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.iterdir())  # refused before the case was read or a folder made


def test_tensorflow_keeps_tf_distribute():
    assert keras.backend.backend() == "tensorflow"
    with pytest.raises(BackendError, match="KERAS_BACKEND=tensorflow.*jax backend.*tf.distribute"):
        distribution.data_parallel(2)
