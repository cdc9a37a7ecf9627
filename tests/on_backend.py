"""Run SD 1.x's networks on another Keras backend, in another environment: a script, not a test.

``python tests/on_backend.py DIR`` reads ``DIR/job.json`` (component names, resolution),
each ``DIR/<name>.weights.h5`` and ``DIR/<name>.inputs.npz``, runs the networks on the backend
``KERAS_BACKEND`` names, and writes ``DIR/<name>.outputs.npz`` plus ``DIR/modules.json`` (which of
tensorflow, keras_cv and torch were imported). The tests that call it compare the outputs with
what the TensorFlow backend computed from the same weights and inputs.
"""

import json
import sys
from pathlib import Path

import numpy as np

folder = Path(sys.argv[1])
job = json.loads((folder / "job.json").read_text())

import keras  # noqa: E402

from fashion_sd.sd import models  # noqa: E402

for name in job["components"]:
    model = models.build_component(name, job["resolution"], folder / f"{name}.weights.h5")
    inputs = np.load(folder / f"{name}.inputs.npz")
    args = [inputs[k] for k in sorted(inputs.files)]
    out = model(args if len(args) > 1 else args[0], training=False)
    np.savez(folder / f"{name}.outputs.npz", out=keras.ops.convert_to_numpy(out))
    del model

modules = {m: m in sys.modules for m in ("tensorflow", "keras_cv", "torch")}
(folder / "modules.json").write_text(json.dumps({"backend": keras.backend.backend(), **modules}))
