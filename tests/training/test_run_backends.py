"""Whole training runs on JAX, without TensorFlow, equal to TensorFlow's: the run folder (LoRA
files, train state, history), the losses, the LoRA, and resume bit for bit on JAX."""

import json

import keras
import numpy as np
import pandas as pd
from backends import run_on_jax
from conftest import ROOT
from tiny import tiny_unet
from train_case import PARTS, run_case

from fashion_sd.config import LoraConfig
from fashion_sd.sd import lora, lora_file

SPEC = LoraConfig(rank=4, alpha=4.0, targets=["to_q", "to_k", "to_v", "out_proj"])


def matrices(path):
    return lora_file.read(path, fits_model=False)[0]


def test_a_run_on_jax_equals_tensorflows_and_resumes_bit_exact(tmp_path, small_parts,
                                                                demo_captions, encoder_cache):
    weights = tmp_path / "weights"
    weights.mkdir()
    for name in PARTS:
        small_parts[name].save_weights(str(weights / f"{name}.weights.h5"))
    keras.utils.set_random_seed(0)
    unet = tiny_unet(8)
    unet.save_weights(str(weights / "unet.weights.h5"))
    # A's draw differs between backends: both runs start from this file instead
    layers = lora.apply_lora(unet, SPEC)
    lora.save_lora(weights / "start.lora.safetensors", layers, SPEC)
    overrides = [f"data.captions={demo_captions}", f"data.cache_dir={encoder_cache}",
                 "model.weights=random", "train.batch_size=4", "train.sample_every=0",
                 "train.deterministic=true", "train.epochs=2", "lora.rank=4", "lora.alpha=4.0",
                 f"lora.init_from={weights / 'start.lora.safetensors'}"]
    (tmp_path / "job.json").write_text(json.dumps({"overrides": overrides,
                                                   "weights": str(weights)}))
    tf_out = run_case(tmp_path)
    run_on_jax(ROOT / "tests" / "train_case.py", tmp_path, timeout=1500)
    jax_out = json.loads((tmp_path / "jax" / "summary.json").read_text())
    assert not any(jax_out["modules"].values()), jax_out["modules"]

    for out in (tf_out, jax_out):
        assert out["straight"]["status"] == "finished" and out["straight"]["step"] == 16
        assert out["first"]["stop_reason"] == "max_steps" and out["first"]["step"] == 5
        assert out["resumed"]["status"] == "finished" and out["resumed"]["step"] == 16
    assert jax_out["straight"]["backend"] == "jax" and jax_out["straight"]["draws"] == "philox-1"
    tf_run, jax_run = tmp_path / "tensorflow" / "straight", tmp_path / "jax" / "straight"
    # the same run folder
    names = lambda root: sorted(p.relative_to(root).as_posix() for p in root.rglob("*")  # noqa: E731
                                if p.is_file() and "tensorboard" not in p.parts)
    assert names(jax_run) == names(tf_run)
    h_tf, h_jax = (pd.read_csv(r / "history.csv") for r in (tf_run, jax_run))
    assert list(h_jax.columns) == list(h_tf.columns)
    np.testing.assert_allclose(h_jax.loss, h_tf.loss, rtol=1e-4)
    np.testing.assert_allclose(h_jax.val_loss, h_tf.val_loss, rtol=1e-4)
    start = matrices(weights / "start.lora.safetensors")
    want, got = (matrices(r / "checkpoints" / "last.lora.safetensors") for r in (tf_run, jax_run))
    for key in start:
        d_tf, d_jax = want[key] - start[key], got[key] - start[key]
        assert np.linalg.norm(d_tf) > 0, key
        # 16 Adam steps: rounding differences grow past one step's 1e-4 (measured below 1e-3)
        assert np.linalg.norm(d_jax - d_tf) <= 1e-3 * np.linalg.norm(d_tf), key
    # a SIGTERM saves the step and exits 143 on both; resume on JAX is bit-exact, as on TensorFlow
    for out in (tf_out, jax_out):
        stopped = out["signalled"]["stopped"]
        assert stopped["exit_code"] == 143 and stopped["saved_step"] == 3, stopped
        assert "SIGTERM at step 3" in stopped["message"] and "--resume" in stopped["message"]
        assert out["signalled"]["resumed"]["status"] == "finished"
    for backend in ("tensorflow", "jax"):
        a = matrices(tmp_path / backend / "straight" / "checkpoints" / "last.lora.safetensors")
        for other in ("resumed", "signalled"):
            b = matrices(tmp_path / backend / other / "checkpoints" / "last.lora.safetensors")
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{backend} {other} {key}")
