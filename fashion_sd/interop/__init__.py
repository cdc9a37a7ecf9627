"""Bridges to the diffusers / CompVis / kohya world. Needs no torch unless a function says so.

Import what you need from its module (nothing is imported here, so renaming a LoRA never
loads Keras):

- :func:`weights.import_model`: an SD 1.x diffusers folder or CompVis single file -> KerasCV weight files.
- :func:`lora_formats.import_lora` / :func:`lora_formats.export_lora`: kohya and diffusers LoRA files <-> fashion-sd's.
- :func:`weights.merge_model`: base weights with a LoRA folded in, as KerasCV files.

torch is needed only to read pickled ``.bin`` / ``.ckpt`` files (``pip install '.[interop]'``).
"""
