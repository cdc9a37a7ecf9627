"""One training step for every backend: the same tiny run on TensorFlow and on JAX (in the JAX
environment, without TensorFlow) gives the same losses, LoRA and EMA, and skips the same steps."""

import json

import numpy as np
import pytest
from backends import run_on_jax, run_on_jax_allowing_failure
from conftest import ROOT
from step_case import assert_same_training, make_case, run_case

from fashion_sd.sd import lora_file


def lora_matrices(path):
    return lora_file.read(path, fits_model=False)[0]


@pytest.mark.parametrize("nan_batch", [None, 1])
def test_training_steps_equal_on_jax_and_tensorflow(tmp_path, nan_batch):
    make_case(tmp_path, batches=4, nan_batch=nan_batch)
    tf_run = run_case(tmp_path)
    run_on_jax(ROOT / "tests" / "step_case.py", tmp_path)
    jax_run = json.loads((tmp_path / "jax.json").read_text())
    assert not (jax_run["tensorflow"] or jax_run["keras_cv"] or jax_run["torch"])
    skipped = 0 if nan_batch is None else 1
    assert tf_run["skipped"] == jax_run["skipped"] == skipped
    assert tf_run["optimizer_steps"] == jax_run["optimizer_steps"] == 4 - skipped
    np.testing.assert_allclose(jax_run["losses"], tf_run["losses"], rtol=1e-5)
    start = lora_matrices(tmp_path / "start.lora.safetensors")
    want, got = lora_matrices(tmp_path / "tensorflow.lora.safetensors"), \
        lora_matrices(tmp_path / "jax.lora.safetensors")
    ema_tf, ema_jax = np.load(tmp_path / "tensorflow.ema.npz"), np.load(tmp_path / "jax.ema.npz")
    # measured: norm 4e-5, element by element 1.5e-6 against 1.4e-3 at one element of 1536
    assert_same_training(start, want, got, ema_tf, ema_jax)


def test_evaluation_on_jax_names_the_backend_that_has_it(tmp_path):
    out = run_on_jax_allowing_failure(
        ROOT / "scripts" / "evaluate_fid.py", "--config", ROOT / "configs" / "demo.yaml",
        "--set", f"output.dir={tmp_path / 'run'}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "needs Keras' tensorflow backend" in out.stderr and "KERAS_BACKEND is jax" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_text_encoders_lora_on_jax_is_refused_before_any_model(tmp_path):
    captions = ["--set", f"data.captions={tmp_path / 'captions.csv'}"]
    run_on_jax(ROOT / "scripts" / "build_captions.py", "--config", ROOT / "configs" / "demo.yaml",
               *captions)
    out = run_on_jax_allowing_failure(
        ROOT / "scripts" / "train.py", "--config", ROOT / "configs" / "demo.yaml", *captions,
        "--set", "lora.text_encoder=true", "--set", f"output.dir={tmp_path / 'run'}", timeout=120)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "lora.text_encoder: true on Keras' jax backend" in out.stderr
    assert "KERAS_BACKEND=tensorflow" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "run.json").exists()


def test_what_jax_cannot_run_is_refused_before_any_model(tmp_path):
    script = tmp_path / "refusals.py"
    script.write_text(
        "import json, sys\n"
        "from fashion_sd.errors import BackendError\n"
        "from fashion_sd.training import jax_machine\n"
        "out = {}\n"
        "for args in [('multi_worker', 'auto', 'auto', 2), ('tpu', 'auto', 'auto', 2),\n"
        "             ('auto', 'mixed_float16', 'auto', 2), ('auto', 'auto', False, 2)]:\n"
        "    try:\n"
        "        jax_machine.resolve(*args)\n"
        "        out[repr(args)] = None\n"
        "    except BackendError as exc:\n"
        "        out[repr(args)] = str(exc)\n"
        "out['ok'] = jax_machine.resolve('auto', 'auto', 'auto', 2)[:4:2]\n"
        "print(json.dumps(out, default=str))\n")
    out = json.loads(run_on_jax(script).stdout.strip().splitlines()[-1])
    assert "tf.distribute" in out["('multi_worker', 'auto', 'auto', 2)"]
    assert "tf.distribute" in out["('tpu', 'auto', 'auto', 2)"]
    assert "F16_F16_F32" in out["('auto', 'mixed_float16', 'auto', 2)"]
    assert "KERAS_BACKEND=tensorflow" in out["('auto', 'auto', False, 2)"]
    assert out["ok"] == ["float32", True]  # a CPU: float32, and XLA always


def test_a_bfloat16_step_agrees_within_its_rounding(tmp_path):
    """Under mixed_bfloat16 the backends round the U-Net's activations in different places
    (their kernels fuse differently), so they agree to bfloat16's rounding, not float32's: the
    runs on JAX and TensorFlow differ by no more than TensorFlow's bfloat16 run differs from its
    own float32 run. Measured on this case (4 steps, AdamW): losses 1.0e-3 apart, LoRA updates
    7.5e-2 of their norm (Adam divides by each gradient's running size, which magnifies the
    rounding), against 1.8e-3 and 8.7e-2 between TensorFlow's bfloat16 and float32."""
    make_case(tmp_path, batches=4)
    f32 = run_case(tmp_path)
    tf_run = run_case(tmp_path, "mixed_bfloat16")
    run_on_jax(ROOT / "tests" / "step_case.py", tmp_path, "mixed_bfloat16")
    jax_run = json.loads((tmp_path / "jax-mixed_bfloat16.json").read_text())
    assert tf_run["skipped"] == jax_run["skipped"] == 0
    start = lora_matrices(tmp_path / "start.lora.safetensors")
    runs = {name: lora_matrices(tmp_path / f"{name}.lora.safetensors")
            for name in ("tensorflow", "tensorflow-mixed_bfloat16", "jax-mixed_bfloat16")}

    def apart(a, b, losses_a, losses_b):
        loss = np.max(np.abs(np.subtract(losses_a, losses_b)) / np.abs(losses_b))
        update = max(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k] - start[k]) for k in start)
        return loss, update

    across = apart(runs["jax-mixed_bfloat16"], runs["tensorflow-mixed_bfloat16"],
                   jax_run["losses"], tf_run["losses"])
    rounding = apart(runs["tensorflow-mixed_bfloat16"], runs["tensorflow"], tf_run["losses"],
                     f32["losses"])
    print(f"JAX vs TensorFlow in bf16: losses {across[0]:.2e}, updates {across[1]:.2e}; "
          f"TensorFlow bf16 vs float32: {rounding[0]:.2e}, {rounding[1]:.2e}")
    assert across[0] <= 2 * rounding[0] and across[1] <= 2 * rounding[1]
    assert 0 < rounding[1] < 0.5  # bf16 trained the same LoRA, rounded
