"""XLA's compile memory on JAX (fashion_sd.sd.jax_compiles), in the JAX environment: the heap
handed back after a long compile only, before the compiled program runs."""

import json
import subprocess

from backends import jax_env, jax_python
from conftest import ROOT

PROBE = r"""
import ctypes, json, sys
import jax, jax.numpy as jnp
from fashion_sd.sd import jax_compiles
on = jax_compiles.prepare()
assert jax_compiles.prepare() is on  # once per process
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()  # JAX still compiles
if not on:
    print(json.dumps({"release_memory": False})); sys.exit()

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

def fragmented_heap():
    # 96 MB of C-heap blocks with every 16th kept: freed, the pages stay in the process
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    blocks = [libc.malloc(16384) for _ in range(6144)]
    for b in blocks:
        ctypes.memset(b, 1, 16384)
    for i, b in enumerate(blocks):
        if i % 16:
            libc.free(ctypes.c_void_p(b))

fragmented_heap()
before = rss()
jax_compiles._after_compile(jax_compiles.COMPILE_EVENT, 0.01)  # a short compile: left alone
short = rss()
jax_compiles._after_compile(jax_compiles.COMPILE_EVENT, 60.0)  # the U-Net's step: trimmed
print(json.dumps({"release_memory": True,
                  "short_mb": (before - short) / 2**20, "long_mb": (short - rss()) / 2**20}))
"""


def probe(tmp_path, **env):
    out = subprocess.run([str(jax_python()), "-c", PROBE], cwd=ROOT, capture_output=True,
                         text=True, env=jax_env({"HOME": str(tmp_path), **env}))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_long_compile_hands_the_freed_heap_back(tmp_path):
    out = probe(tmp_path)
    assert out["release_memory"]  # Linux with glibc, as CI and the GPU machines are
    assert out["short_mb"] < 8, out
    assert out["long_mb"] > 48, out  # of the 90 MB freed between the kept blocks
    assert not probe(tmp_path, FASHION_SD_KEEP_COMPILE_MEMORY="1")["release_memory"]
