"""One line describing the machine a benchmark ran on."""

from __future__ import annotations

from fashion_sd.training.hardware import describe as _describe


def describe() -> str:
    d = _describe()
    gpus = ", ".join(d["gpus"]) or "no GPU"
    return f"{d['cpu']}, {d['cpu_count']} CPUs, {gpus}, Python {d['python']}"
