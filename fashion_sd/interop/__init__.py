"""Bridges to the diffusers / CompVis / kohya world. Needs no torch unless a function says so.

- :func:`import_model`: an SD 1.x diffusers folder or CompVis single file -> KerasCV weight files.
- :func:`import_lora` / :func:`export_lora`: kohya and diffusers LoRA files <-> fashion-sd's.
- :func:`merge_model`: base weights with a LoRA folded in, as KerasCV files.

torch is needed only to read pickled ``.bin`` / ``.ckpt`` files (``pip install '.[interop]'``).
"""

from fashion_sd.interop.lora_formats import export_lora, import_lora
from fashion_sd.interop.tensors import InteropError
from fashion_sd.interop.weights import import_model, merge_model

__all__ = ["InteropError", "export_lora", "import_lora", "import_model", "merge_model"]
