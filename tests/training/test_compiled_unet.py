"""On the real KerasCV U-Net at 64 px: the fused attention equals KerasCV's, and XLA training
equals training without it (slow: about 2
minutes and 12 GB, in its own process; this file sorts early so the suite's process is still small)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_xla_step_equals_non_xla_on_the_real_unet():
    """The same loss to rel 1e-5, the same LoRA update to 1e-3 of its largest element (XLA fuses
    and reorders float32 sums over the U-Net's activations)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "xla_unet_check.py")], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    r = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    # the fused attention equals KerasCV's on all 32 attention layers (16 transformers x 2)
    assert int(r["attention_layers"]) == 32 and float(r["fused_rel"]) < 1e-5, r
    assert r["jit"] == "False,True"
    loss0, loss1 = map(float, r["loss"].split(","))
    assert abs(loss1 - loss0) <= 1e-5 * abs(loss0)
    assert float(r["max_update"]) > 0
    assert float(r["max_update_diff"]) <= 1e-3 * float(r["max_update"]), r
