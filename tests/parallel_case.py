"""step_case's tiny training run under Keras' DataParallel, on as many devices as JAX sees.

``XLA_FLAGS=--xla_force_host_platform_device_count=2 KERAS_BACKEND=jax python
tests/parallel_case.py DIR [BATCH_SIZE]`` (XLA reads the flag when jax starts, so it must be in
the environment, not set here) splits the batch with
:func:`fashion_sd.training.distribution.data_parallel`, runs ``step_case.run_case`` on the files
``step_case.make_case`` wrote in DIR and writes its outputs in ``DIR/devices-N/`` (``jax.json``,
``jax.lora.safetensors``, ``jax.ema.npz``). ``jax.json`` adds how the run was split: the mesh, the
sharding of a batch and of the trainable variables as the jitted step saw them, and how far the
devices' copies of each variable are apart after training. ``BATCH_SIZE`` (default step_case's)
is what ``data_parallel`` is asked to split; one it refuses exits 2 with its message.
"""

import json
import sys
from pathlib import Path
from unittest import mock

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import step_case  # noqa: E402

from fashion_sd.errors import reported  # noqa: E402
from fashion_sd.training import distribution  # noqa: E402
from fashion_sd.training import trainer as tr  # noqa: E402

CASE_FILES = ("unet.weights.h5", "start.lora.safetensors", "batches.npz")


def _sharding(sharding, shape) -> dict:
    return {"sharding": str(sharding), "devices": len(sharding.device_set),
            "shard_shape": list(sharding.shard_shape(tuple(shape)))}


class ShardingProbe(tr.LoraTrainer):
    """The trainer step_case builds, recording the shardings its step is compiled with: the
    inputs as Keras' JAX trainer placed them, and the trainable state."""

    seen: dict = {}
    instances: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        ShardingProbe.instances.append(self)

    def train_step(self, state, data):
        x = data[0] if isinstance(data, tuple) else data  # Keras' (x, y, sample_weight)
        noise = x["noise"]
        lora_a = next(v for v, k in zip(state[0], self.trainable_variables)
                      if "lora_kernel_a" in k.path)
        for name, value in (("noise", noise), ("lora_a", lora_a)):
            jax.debug.inspect_array_sharding(
                value, callback=lambda s, name=name, shape=value.shape: self.seen.setdefault(
                    name, _sharding(s, shape)))
        return super().train_step(state, data)


def replica_spread(variables) -> float:
    """The largest difference between two devices' copies of any of ``variables``."""
    spread = 0.0
    for v in variables:
        copies = [np.asarray(s.data) for s in v.value.addressable_shards]
        spread = max([spread] + [float(np.abs(c - copies[0]).max()) for c in copies[1:]])
    return spread


@reported()
def main(argv: list[str]) -> int:
    folder = Path(argv[0])
    batch_size = int(argv[1]) if len(argv) > 1 else step_case.BATCH
    parallelism = distribution.data_parallel(batch_size)
    out = folder / f"devices-{parallelism.device_count}"
    out.mkdir()
    for name in CASE_FILES:
        (out / name).symlink_to((folder / name).resolve())
    with mock.patch.object(tr, "LoraTrainer", ShardingProbe):
        step_case.run_case(out)
    trainer, = ShardingProbe.instances
    mesh = parallelism.mesh
    record = json.loads((out / "jax.json").read_text())
    record.update({
        "jax_device_count": jax.device_count(), "parallelism": str(parallelism),
        "processes": parallelism.processes, "jax_distributed": jax.distributed.is_initialized(),
        "mesh_shape": None if mesh is None else list(mesh.shape),
        "mesh_axes": None if mesh is None else list(mesh.axis_names),
        "step_saw": ShardingProbe.seen,
        "trainable_devices": sorted({len(v.value.sharding.device_set)
                                     for v in trainer.trainable_variables}),
        "replica_spread": replica_spread(trainer.trainable_variables)})
    (out / "jax.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
