"""The machine a run or a benchmark is on, in words, without any backend library: the CPU's
name, the CPU count, Python and the platform. Each backend adds the accelerators it sees
(:func:`fashion_sd.training.hardware.describe`, :func:`fashion_sd.training.jax_machine.describe`)."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe() -> dict:
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}
