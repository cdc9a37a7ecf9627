"""One process of a multi-worker test run: ``run.train`` (as train.py calls it) with the tiny
U-Net and KerasCV's real encoders at 64 px, random init seeded as the tests' ``small_parts``.

    python tests/multiworker_train.py SETTINGS_JSON [--worker INDEX --ports P0,P1] [--resume]
        [--die-at-step N]

SETTINGS_JSON: a JSON list of ``--set`` overrides on configs/demo.yaml. ``--worker`` sets
``TF_CONFIG`` for worker INDEX of a loopback cluster on PORTS; ``--die-at-step N`` kills this
process with SIGKILL after micro-batch N, as a crashed host would go.
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

parser = argparse.ArgumentParser()
parser.add_argument("settings")
parser.add_argument("--worker", type=int)
parser.add_argument("--ports")
parser.add_argument("--resume", action="store_true")
parser.add_argument("--die-at-step", type=int)
args = parser.parse_args()
if args.worker is not None:
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"localhost:{p}" for p in args.ports.split(",")]},
        "task": {"type": "worker", "index": args.worker}})

import keras  # noqa: E402
from tiny import tiny_unet  # noqa: E402

from fashion_sd.config import load_config  # noqa: E402
from fashion_sd.sd import models  # noqa: E402
from fashion_sd.training import callbacks, run

cfg = load_config(HERE.parent / "configs/demo.yaml", json.loads(args.settings))


def build(source, resolution):
    """The tests' ``small_parts`` (seed 0), then the tiny U-Net from seed 1: what
    ``test_multiworker.build`` makes in the test process, so the runs compare."""
    keras.utils.set_random_seed(0)
    parts = {n: models.build_component(n, 64) for n in ("text_encoder", "image_encoder", "decoder")}
    keras.utils.set_random_seed(1)
    return models.Components(source, resolution, diffusion_model=tiny_unet(resolution // 8), **parts)


if args.die_at_step is not None:
    guard_end = callbacks.StepGuard.on_train_batch_end

    def dying(self, batch, logs=None):
        guard_end(self, batch, logs)
        if self.state.step >= args.die_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    callbacks.StepGuard.on_train_batch_end = dying

summary = run.train(cfg, resume=args.resume, progress=None, verbose=0, build=build)
print("SUMMARY " + json.dumps({k: summary.get(k) for k in ("status", "step", "strategy",
                                                          "workers", "replicas")}))
