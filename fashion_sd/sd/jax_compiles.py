"""Hand XLA's compile-time memory back to the system before the compiled program runs (Keras'
JAX backend, on Linux).

XLA's CPU compiler frees what it used to compile the U-Net's step, but glibc keeps the freed
pages in its per-thread arenas and the step's own buffers are then allocated beside them. This
was issue 28's "killed at 18.5 GB" (neither Keras' ``enable_lora`` nor the attention swap).
Measured on a 2-core CPU, the project's LoRA step at 64 px under mixed_bfloat16: 13.7 GB held
after the compile, 6.4 GB after ``malloc_trim``; the step's peak 19.6 -> 12.3 GB, and
``benchmarks/train_step.py``'s peak 18.2 -> 13.0 GB (float32: 10.9 -> 9.8 GB). Written here
because no library does it from inside the process: an allocator that returns memory by itself
(jemalloc, tcmalloc) has to be preloaded before Python starts, and JAX has no option for it.
JAX's monitoring hook says when a backend compile has finished, before the program runs.
``FASHION_SD_KEEP_COMPILE_MEMORY=1`` leaves the memory as it is (to measure without it).

JAX's persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``, read by JAX itself) is left
to the user: on the CPU it raised the training command's peak from 12.1 to 14.5 GB at 64 px.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# Keras' JAX backend compiles small functions eagerly all the time (milliseconds each); only the
# long compiles (the networks and the step) leave gigabytes behind.
MIN_COMPILE_SECONDS = 1.0
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch's name
KEEP_MEMORY_ENV = "FASHION_SD_KEEP_COMPILE_MEMORY"


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    return None if name is None else getattr(ctypes.CDLL(name), "malloc_trim", None)


def _after_compile(event: str, duration: float, **_) -> None:
    if event == COMPILE_EVENT and duration >= MIN_COMPILE_SECONDS:
        _malloc_trim()(0)


@functools.cache
def prepare() -> bool:
    """Trim the C heap after every long XLA compile in this process, from now on (once per
    process). Returns whether it is on: False off glibc, or with ``FASHION_SD_KEEP_COMPILE_MEMORY=1``."""
    if os.environ.get(KEEP_MEMORY_ENV) == "1" or _malloc_trim() is None:
        return False
    import jax

    jax.monitoring.register_event_duration_secs_listener(_after_compile)
    return True
