"""One line describing the machine a benchmark ran on (no TensorFlow: GPU machines may lack it)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

from fashion_sd.host import cpu_name


def gpus() -> list[str]:
    """GPU names as the driver reports them (nvidia-smi), or none."""
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def describe() -> str:
    names = ", ".join(gpus()) or "no GPU"
    return f"{cpu_name()}, {os.cpu_count()} CPUs, {names}, Python {platform.python_version()}"
