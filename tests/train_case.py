"""Whole training runs (``train()`` as ``scripts/train.py`` calls it) on whatever backend Keras
runs, from files: the same code on both sides of the cross-backend run tests.

``python tests/train_case.py DIR`` reads ``DIR/job.json`` (the config overrides, the components'
weights folder) and runs, each into its own output.dir under ``DIR/<backend>/``: ``straight``
(the whole run), ``resumed`` (stopped at ``train.max_steps=5``, then ``--resume``d) and
``signalled`` (a SIGTERM during step 3, then ``--resume``d); it writes
``DIR/<backend>/summary.json``.
"""

import json
import os
import signal
import sys
from pathlib import Path

import keras

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_unet  # noqa: E402

from fashion_sd.config import load_config  # noqa: E402
from fashion_sd.sd import models  # noqa: E402
from fashion_sd.training import callbacks, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("text_encoder", "image_encoder", "decoder")


def builder(weights: Path):
    """Components from saved weights (a random init differs between backends; files do not)."""
    def build(source, resolution):
        comps = models.Components(source, resolution)
        for name in PARTS:
            setattr(comps, name, models.build_component(name, resolution,
                                                        weights / f"{name}.weights.h5"))
        comps.diffusion_model = tiny_unet(resolution // 8)
        comps.diffusion_model.load_weights(str(weights / "unet.weights.h5"))
        return comps
    return build


def config(job: dict, out: Path, *extra):
    return load_config(ROOT / "configs" / "demo.yaml", [*job["overrides"], f"output.dir={out}",
                                                         *extra])


def run_case(folder: Path) -> dict:
    job = json.loads((folder / "job.json").read_text())
    build = builder(Path(job["weights"]))
    here = folder / keras.config.backend()
    straight = run.train(config(job, here / "straight"), progress=None, verbose=0, build=build)
    first = run.train(config(job, here / "resumed", "train.max_steps=5"), progress=None,
                      verbose=0, build=build)
    resumed = run.train(config(job, here / "resumed"), resume=True, progress=None, verbose=0,
                        build=build)
    out = {"straight": straight, "first": first, "resumed": resumed,
           "signalled": signalled(job, here / "signalled", build),
           "modules": {m: m in sys.modules for m in ("tensorflow", "keras_cv", "torch")}}
    (here / "summary.json").write_text(json.dumps(out, default=str))
    return out


def signalled(job: dict, out: Path, build) -> dict:
    """SIGTERM while step 3 runs: its train state is saved and the run exits 143; resumed."""
    guard = callbacks.StepGuard.on_train_batch_end

    def signal_during_step_3(self, batch, logs=None):
        if self.state.step == 2:  # the third step has just run: the signal arrives now
            os.kill(os.getpid(), signal.SIGTERM)
        return guard(self, batch, logs)

    callbacks.StepGuard.on_train_batch_end = signal_during_step_3
    try:
        run.train(config(job, out), progress=None, verbose=0, build=build)
        raise AssertionError("the SIGTERM did not stop the run")
    except run.TrainingInterrupted as exc:
        stopped = {"exit_code": exc.exit_code, "message": str(exc),
                   "saved_step": run.load_train_state_step(out / "checkpoints" /
                                                           "train_state.safetensors")}
    finally:
        callbacks.StepGuard.on_train_batch_end = guard
    resumed = run.train(config(job, out), resume=True, progress=None, verbose=0, build=build)
    return {"stopped": stopped, "resumed": resumed}


if __name__ == "__main__":
    run_case(Path(sys.argv[1]))
