"""Training on several machines: two worker processes on loopback ports (MultiWorkerMirroredStrategy,
TF_CONFIG) against one process with the same global batch, and a worker killed mid-run.

Each worker is ``tests/multiworker_train.py``: ``run.train`` as train.py calls it, with the tiny
U-Net. Tolerance for "the same LoRA weights": 1e-6 absolute on weights of order 0.4 (measured
on this CPU: 1e-8 to 3e-8; the two processes sum the replicas' gradients in another order).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT
from safetensors.numpy import load_file
from tiny import tiny_unet

from fashion_sd.commands.workers import free_ports
from fashion_sd.config import load_config
from fashion_sd.sd import models
from fashion_sd.training import run

pytestmark = pytest.mark.multiprocess
SCRIPT = ROOT / "tests" / "multiworker_train.py"
TOL = 1e-6


@pytest.fixture
def build(small_parts):
    def make(source, resolution):  # as multiworker_train.build
        keras.utils.set_random_seed(1)
        return models.Components(source, resolution, diffusion_model=tiny_unet(resolution // 8),
                                 **small_parts)
    return make


@pytest.fixture
def small_captions(tmp_path, demo_captions):
    """8 training rows (4 steps an epoch at batch 2) and the demo's val and test rows."""
    df = pd.read_csv(demo_captions)
    out = tmp_path / "captions.csv"
    pd.concat([df[df.split == "train"].head(8), df[df.split != "train"]]).to_csv(out, index=False)
    return out


def settings(tmp_path, captions, cache, name, *more):
    return [f"data.captions={captions}", f"data.cache_dir={cache}",
            f"output.dir={tmp_path / name}", "model.weights=random", "train.batch_size=2",
            "train.sample_every=0", "train.deterministic=true", "train.epochs=2", *more]


TIMEOUT = 1800  # seconds for a worker to end: a bound for a hung test only (each takes about a minute)


def workers(sets, ports, *extra, tmp: Path, die=None):
    """Start worker 0 and 1 with the same settings; returns their (returncode, output).

    Their output goes to files, not pipes: a pipe read only after the first worker has ended
    fills up, and the second worker then blocks on its next line, whatever the time limit."""
    procs, outs = [], []
    for index in (0, 1):
        args = [sys.executable, str(SCRIPT), json.dumps(sets), "--worker", str(index),
                "--ports", ports, *extra]
        if die is not None and index == 1:
            args += ["--die-at-step", str(die)]
        outs.append(tmp / f"worker{index}.{len(list(tmp.glob('worker*')))}.out")
        procs.append(subprocess.Popen(args, stdout=outs[-1].open("w"), stderr=subprocess.STDOUT,
                                      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}))
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail("a worker hung:\n" + "\n".join(o.read_text()[-3000:] for o in outs))
    finally:
        for p in procs:
            p.kill()
    return [(code, out.read_text()) for code, out in zip(codes, outs)]


def assert_same_lora(a, b):
    a, b = load_file(str(a)), load_file(str(b))
    assert a.keys() == b.keys()
    assert max(np.abs(a[k] - b[k]).max() for k in a) < TOL
    assert max(np.abs(a[k]).max() for k in a) > 100 * TOL  # trained away from zero


def test_two_workers_train_as_one_process_with_the_same_global_batch(
        tmp_path, small_captions, encoder_cache, build):
    one = settings(tmp_path, small_captions, encoder_cache, "one", "train.max_steps=3")
    run.train(load_config(ROOT / "configs/demo.yaml", one), progress=None, verbose=0,
              build=build)
    two = settings(tmp_path, small_captions, encoder_cache, "two", "train.max_steps=3",
                   "train.strategy=multi_worker", "train.sample_every=1", "train.sample_steps=2")
    (rc0, out0), (rc1, out1) = workers(two, ",".join(map(str, free_ports(2))), tmp=tmp_path)
    assert (rc0, rc1) == (0, 0), out0[-3000:] + out1[-3000:]
    for out in (out0, out1):
        assert '"step": 3, "strategy": "multi_worker", "workers": 2, "replicas": 2' in out
        assert "global batch 2 (1 per replica); learning rate 0.0001 as configured" in out
    assert "this worker writes nothing" in out1 and "this worker writes nothing" not in out0
    assert_same_lora(tmp_path / "one/checkpoints/last.lora.safetensors",
                     tmp_path / "two/checkpoints/last.lora.safetensors")
    # Only the chief wrote: one TensorBoard log, one history, the chief's samples.
    out = tmp_path / "two"
    assert len(list((out / "tensorboard/train").glob("events.out.tfevents.*"))) == 1
    assert pd.read_csv(out / "history.csv").step.tolist() == [3]
    assert (out / "samples/step_000003.png").stat().st_size > 1000
    record = json.loads((out / "run.json").read_text())
    assert (record["strategy"], record["workers"], record["replicas"]) == ("multi_worker", 2, 2)
    # the val loss the chief computed is one process's, to float32 rounding
    ref = pd.read_csv(tmp_path / "one/history.csv")
    np.testing.assert_allclose(pd.read_csv(out / "history.csv").val_loss, ref.val_loss, rtol=1e-6)


def test_a_killed_worker_and_a_resume_lose_nothing(tmp_path, small_captions, encoder_cache, build):
    one = settings(tmp_path, small_captions, encoder_cache, "one")
    run.train(load_config(ROOT / "configs/demo.yaml", one), progress=None, verbose=0,
              build=build)
    two = settings(tmp_path, small_captions, encoder_cache, "two", "train.strategy=multi_worker")
    ports = ",".join(map(str, free_ports(2)))
    # worker 1 dies (SIGKILL) at step 6, after epoch 1's checkpoint at step 4
    (rc0, out0), (rc1, _) = workers(two, ports, die=6, tmp=tmp_path)
    assert rc1 == -9
    assert rc0 == 1 and "a worker of the cluster was lost" in out0
    assert "(step 4) is intact: restart every worker with the same command and --resume" in out0
    (rc0, out0), (rc1, out1) = workers(two, ports, "--resume", tmp=tmp_path)
    assert (rc0, rc1) == (0, 0), out0[-3000:] + out1[-3000:]
    assert '"status": "finished", "step": 8' in out0
    assert pd.read_csv(tmp_path / "two/history.csv").step.tolist() == [4, 8]
    assert_same_lora(tmp_path / "one/checkpoints/last.lora.safetensors",
                     tmp_path / "two/checkpoints/last.lora.safetensors")
