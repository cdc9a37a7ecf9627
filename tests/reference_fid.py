"""pytorch-fid's ``calculate_frechet_distance``, the reference FID, without importing torch.

pytorch-fid (https://github.com/mseitzer/pytorch-fid) is the implementation most published FIDs
come from, but its module imports torch and torchvision at the top. ``make test`` installs the
wheel with ``--no-deps``; here its source is parsed and only that one function is executed, with
the names it uses (``np``, ``linalg``) bound to numpy and scipy.linalg as in its own module.
Tests and benchmarks import :func:`reference_frechet_distance` from here.
"""

from __future__ import annotations

import ast
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg

PACKAGE = "pytorch-fid==0.3.0"
_FUNCTION = "calculate_frechet_distance"


class ReferenceMissing(RuntimeError):
    """pytorch-fid is not installed (``make test`` installs it)."""


def _source_file() -> Path:
    spec = importlib.util.find_spec("pytorch_fid")
    if spec is None or not spec.submodule_search_locations:
        raise ReferenceMissing(
            f"{PACKAGE} is not installed: run `make test` (it installs it), or "
            f"`.venv/bin/python -m pip install --no-deps {PACKAGE}` (without --no-deps it would "
            f"pull torch)")
    path = Path(next(iter(spec.submodule_search_locations))) / "fid_score.py"
    if not path.is_file():
        raise ReferenceMissing(f"{path} not found: reinstall {PACKAGE} with `make test`")
    return path


def load_reference():
    """pytorch-fid's function object, compiled from its source file alone."""
    path = _source_file()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == _FUNCTION]
    if len(defs) != 1:
        raise ReferenceMissing(f"{path} has no top-level {_FUNCTION}(); expected {PACKAGE}")
    namespace = {"np": np, "linalg": scipy.linalg}
    code = compile(ast.Module(body=defs, type_ignores=[]), str(path), "exec")
    exec(code, namespace)  # noqa: S102 - the installed package's own source
    return namespace[_FUNCTION]


def reference_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's FID on the given statistics, as a float."""
    fn = load_reference()
    with warnings.catch_warnings():
        # SciPy >= 1.16 deprecates sqrtm's `disp` argument, which pytorch-fid 0.3.0 passes.
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(fn(mu1, sigma1, mu2, sigma2))
