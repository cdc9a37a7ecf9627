"""Stable Diffusion 1.x in Keras 3 ops, with LoRA: the networks (``unet``, ``text_encoder``, ``vae``), the sampling
loop (``ddim``), the components and their weights
(``models``), LoRA on the attention projections (``lora``) and its file format (``lora_file``,
light), the fast attention (``attention``) and CLIP's tokenizer (``tokenizer``). Shared by
training, evaluation, serving and interop."""
