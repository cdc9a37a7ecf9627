"""fashion-sd: LoRA fine-tuning of KerasCV Stable Diffusion on a fashion catalogue, scored by FID."""

__version__ = "0.1.0"
