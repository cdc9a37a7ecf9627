"""Stage 4, serving: prompts -> images with a LoRA (``generate``, the one inference recipe), the
designers' assistant (``assistant``) and its web page (``webapp``), and the settings every
image records (``image_settings``)."""
