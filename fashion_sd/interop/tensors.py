"""Reading tensors from the files other tools write: safetensors (any float dtype), torch pickles.

safetensors are read without torch, straight from the file's JSON header and a memory map, because
numpy has no bfloat16 and ``safetensors.numpy`` refuses such files; a bf16 tensor is widened to
float32 exactly (a bf16 value is the upper half of a float32). ``.bin`` / ``.ckpt`` / ``.pt`` are
pickles: they are opened only with ``torch.load(weights_only=True)``, which never runs pickled
code, and need the ``interop`` extra.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from pathlib import Path

import numpy as np

from fashion_sd.errors import FashionSDError
from fashion_sd.safetensors_file import NUMPY_DTYPES, decode
from fashion_sd.safetensors_file import safetensors_header as read_header

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


class InteropError(FashionSDError, ValueError):
    """A source file or key that cannot be converted; the message names it and says what to do."""


def safetensors_header(path: str | Path) -> tuple[dict, dict[str, str]]:
    """(tensor entries, ``__metadata__``) of a safetensors file, without reading its data."""

    try:
        return read_header(path)
    except (OSError, ValueError) as exc:
        raise InteropError(f"{path}: not a readable safetensors file ({exc})") from None


class SafetensorsFile:
    """Lazy access to the tensors of one safetensors file: ``f[name]`` reads one tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries, self.metadata = safetensors_header(self.path)
        with self.path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            self._base = 8 + n
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)

    def keys(self):
        return self.entries.keys()

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        if entry["dtype"] not in NUMPY_DTYPES:
            raise InteropError(f"{self.path}: {name} has dtype {entry['dtype']}, which this reader "
                               "does not handle (float64/32/16, bfloat16 and integers are supported)")
        return decode(self._map, self._base, entry)


def load_pickle(path: str | Path) -> dict[str, np.ndarray]:
    """A torch pickle's tensors as numpy, loaded with ``weights_only=True`` (no code runs)."""
    path = Path(path)
    try:
        import torch
    except ImportError:
        raise InteropError(f"{path}: reading a torch pickle ({path.suffix}) needs torch: "
                           "pip install '.[interop]', or convert the file to .safetensors") from None
    try:
        try:  # memory-mapped where the file is in torch's zip format; old pickles cannot be
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError when the pickle wants to run code
        # torch's own message suggests loading with weights_only=False, which runs whatever code
        # the file holds: never passed on.
        raise InteropError(f"{path}: not a tensor file this tool can open safely ({type(exc).__name__}); "
                           "it is not a checkpoint, or it needs code to load. Give a .safetensors "
                           "file (kohya, diffusers and A1111 LoRAs are published as .safetensors)") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # CompVis/Lightning checkpoints nest the weights
    if not isinstance(obj, dict):
        raise InteropError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy().copy()
    return out


class Tensors:
    """Named tensors of one or more files, read lazily; records every name read."""

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)
        self._where: dict[str, object] = {}
        for p in self.paths:
            src = SafetensorsFile(p) if p.suffix == ".safetensors" else load_pickle(p)
            for k in src.keys():
                if k in self._where:
                    raise InteropError(f"{p}: tensor {k} is also in another file of this source")
                self._where[k] = src

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        src = self._where[name]
        return src.shape(name) if isinstance(src, SafetensorsFile) else tuple(src[name].shape)

    def dtype(self, name: str) -> str:
        src = self._where[name]
        return src.dtype(name) if isinstance(src, SafetensorsFile) else str(src[name].dtype)

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name][name]


def sha256(path: str | Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
