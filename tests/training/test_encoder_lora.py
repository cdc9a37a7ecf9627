"""Text-encoder LoRA training, its cases (tests/te_lora_cases.py) in a process of their own: they
build fresh real-size CLIP text encoders (three minutes on 2 cores), so the test is marked slow
and runs in make test's second lane, beside the fast and training tests."""

import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_text_encoder_lora_cases_in_their_own_process():
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "te_lora_cases.py")], cwd=ROOT,
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "2 passed" in out.stdout, out.stdout[-2000:]
