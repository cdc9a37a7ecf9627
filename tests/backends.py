"""The second environment the tests run code in: Keras on JAX, without TensorFlow or keras_cv.

``make test`` creates it (``.venv-jax``, requirements-jax.txt). A test that needs it and does not
find it fails with the command that makes it, rather than skipping: the JAX path is a promise.
"""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JAX_PYTHON = ROOT / ".venv-jax" / "bin" / "python"


def jax_python() -> Path:
    if not JAX_PYTHON.exists():
        raise AssertionError(f"{JAX_PYTHON} not found: `make setup-jax` creates the JAX "
                             "environment these tests run code in")
    return JAX_PYTHON


def jax_env(env: dict | None = None) -> dict:
    """The JAX environment's variables: ``KERAS_BACKEND=jax``, plus ``env`` (``XLA_FLAGS``,
    which XLA reads only when jax starts)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KERAS_BACKEND": "jax",
            "HOME": os.environ.get("HOME", "/root"), **(env or {})}


def run_on_jax_allowing_failure(script: Path, *args, timeout: int = 900,
                                env: dict | None = None):
    """Run ``script`` with the JAX environment's Python under ``KERAS_BACKEND=jax``."""
    return subprocess.run([str(jax_python()), str(script), *map(str, args)], cwd=ROOT,
                          env=jax_env(env), capture_output=True, text=True, timeout=timeout)


def run_on_jax_measured(script: Path, *args, timeout: int = 900) -> tuple:
    """As :func:`run_on_jax`, also returning the process's peak resident memory in GB (its own
    ``ru_maxrss`` from ``wait4``, not the largest of every child the test process waited for)."""
    import tempfile
    import threading

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([str(jax_python()), str(script), *map(str, args)], cwd=ROOT,
                                env=jax_env(), stdout=out, stderr=err, text=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
    return _succeeded(done), usage.ru_maxrss / 2**20  # Linux counts KiB


def run_on_jax(script: Path, *args, timeout: int = 900, env: dict | None = None):
    """As :func:`run_on_jax_allowing_failure`, asserting that it succeeded."""
    return _succeeded(run_on_jax_allowing_failure(script, *args, timeout=timeout, env=env))


def _succeeded(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def modules(folder: Path) -> dict:
    return json.loads((folder / "modules.json").read_text())
