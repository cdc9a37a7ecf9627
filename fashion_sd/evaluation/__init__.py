"""Stage 3, evaluation: each checkpoint scored (``evaluate``) with FID and KID on Inception
features, prompt adherence (CLIP) and garment judgements.

``fid``, ``adherence`` and ``garment`` hold the numerics (numpy/scipy only); ``inception`` and
``clip`` the networks (TensorFlow); ``judge`` puts the per-image judgements together. Import
from each module: nothing is imported here, so the numerics never load TensorFlow.
"""
