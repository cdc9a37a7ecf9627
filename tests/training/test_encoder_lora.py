"""Text-encoder LoRA training, its cases (tests/te_lora_cases.py) in a process of their own: they
build fresh CLIP text encoders, and run early in the suite (sorted before the heavy files) so
the two processes together stay well inside the machine's memory."""

import subprocess
import sys

from conftest import ROOT


def test_text_encoder_lora_cases_in_their_own_process():
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "te_lora_cases.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "2 passed" in out.stdout, out.stdout[-2000:]
