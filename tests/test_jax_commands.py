"""The commands on Keras' JAX backend, in the environment without TensorFlow or keras_cv
(``.venv-jax``), on the demo config: captions, a one-step training run with the real-size
U-Net at 64 px, then generation with the LoRA it wrote. Marked slow (minutes: XLA compiles the
U-Net's step on the CPU); it runs in a process of its own (make test)."""

import json
import subprocess

import pytest
from backends import jax_python, run_on_jax
from conftest import ROOT

from fashion_sd.serving.image_settings import ImageSettings

pytestmark = pytest.mark.slow


def test_the_jax_environment_has_no_tensorflow_and_no_keras_cv():
    for module in ("tensorflow", "keras_cv"):
        out = subprocess.run([str(jax_python()), "-c", f"import {module}"], capture_output=True,
                             text=True)
        assert out.returncode != 0 and "No module named" in out.stderr, module


def test_train_and_generate_commands_on_jax(tmp_path):
    demo = ROOT / "configs" / "demo.yaml"
    captions = tmp_path / "captions.csv"
    sets = ["--set", f"data.captions={captions}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", f"output.dir={tmp_path / 'run'}"]
    run_on_jax(ROOT / "scripts" / "build_captions.py", "--config", demo, *sets)
    out = run_on_jax(ROOT / "scripts" / "train.py", "--config", demo, *sets,
                     "--set", "train.max_steps=1", "--set", "train.sample_every=0",
                     timeout=1800)
    assert "stopped: step 1" in out.stdout, out.stdout[-2000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["backend"] == "jax" and record["random_init"] is True
    assert "tensorflow" not in record["versions"]
    lora = tmp_path / "run" / "checkpoints" / "last.lora.safetensors"
    assert lora.is_file() and (tmp_path / "run" / "checkpoints" / "train_state.safetensors").is_file()
    out = run_on_jax(ROOT / "scripts" / "generate.py", "--config", demo, *sets, "--lora", lora,
                     "--prompt", "an image of a 2011 Casual Fall White Men's Sweater",
                     "--steps", "2", "--num-images", "1", "--out", tmp_path / "images",
                     timeout=1200)
    settings = ImageSettings.read_png(tmp_path / "images" / "p000_s0.png")
    assert settings.noise == "philox" and settings.lora == str(lora)
    assert "RANDOM-INIT" in out.stdout
