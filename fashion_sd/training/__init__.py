"""Stage 2, training: a LoRA fine-tuning run from a config (``run``, read as its phases), the
train step (``trainer``), what a run leaves behind (``callbacks``), the encoder cache (``data``,
``cache``, ``shards``), the machine (``hardware``, ``multiworker``), clean stops (``stopping``)
and grids of runs (``sweep``)."""
