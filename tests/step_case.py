"""One short training run on a tiny U-Net, from files, on whatever backend Keras runs: the same
code on both sides of the cross-backend tests. ``python tests/step_case.py DIR [PRECISION]`` runs
it on the backend ``KERAS_BACKEND`` names, in float32 or under a Keras mixed policy
(``mixed_bfloat16``), and writes ``DIR/<name>.lora.safetensors``, ``DIR/<name>.ema.npz`` and
``DIR/<name>.json`` (losses, counters, optimizer steps, imported modules), ``<name>`` the backend
followed by ``-<policy>`` when not float32."""

import json
import sys
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from tiny import tiny_unet  # noqa: E402

from fashion_sd.config import LoraConfig, TrainConfig  # noqa: E402
from fashion_sd.sd import lora  # noqa: E402
from fashion_sd.training import trainer as tr  # noqa: E402

SPEC = LoraConfig(rank=2, alpha=4.0, targets=["to_q", "to_k", "to_v", "out_proj"])
BATCH = 2


def make_case(folder: Path, batches: int = 4, nan_batch: int | None = None) -> None:
    """Base weights, a starting LoRA (B not zero, so A gets gradients too) and the batches."""
    keras.utils.set_random_seed(0)
    unet = tiny_unet()
    unet.save_weights(str(folder / "unet.weights.h5"))
    layers = lora.apply_lora(unet, SPEC)
    rng = np.random.default_rng(0)
    for layer in layers.values():
        layer.lora_kernel_b.assign(0.05 * rng.standard_normal(layer.lora_kernel_b.shape))
    lora.save_lora(folder / "start.lora.safetensors", layers, SPEC)
    n = batches * BATCH
    data = {"moments": rng.standard_normal((n, 8, 8, 8)).astype("float32"),
            "context": rng.standard_normal((n, 77, 768)).astype("float32"),
            "vae_eps": rng.standard_normal((n, 8, 8, 4)).astype("float32"),
            "noise": rng.standard_normal((n, 8, 8, 4)).astype("float32"),
            "timesteps": rng.integers(0, 1000, n).astype("int32")}
    if nan_batch is not None:
        data["noise"][nan_batch * BATCH] = np.nan
    np.savez(folder / "batches.npz", **data)


def run_case(folder: Path, precision: str = "float32") -> dict:
    backend = keras.backend.backend()
    name = backend if precision == "float32" else f"{backend}-{precision}"
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        return _run_case(folder, precision, name)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _run_case(folder: Path, precision: str, name: str) -> dict:
    unet = tiny_unet()
    unet.load_weights(str(folder / "unet.weights.h5"))
    layers = lora.apply_lora(unet, SPEC)
    lora.load_lora(folder / "start.lora.safetensors", layers)
    trainer = tr.LoraTrainer(unet, snr_gamma=5.0)
    train = TrainConfig(learning_rate=1e-3, warmup_steps=2, ema_decay=0.9, grad_clip=0.5)
    trainer.compile(optimizer=tr.make_optimizer(train, 10, precision))
    batches = dict(np.load(folder / "batches.npz"))
    losses = []

    class Losses(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(float(logs["loss"]))

    trainer.fit(batches, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                callbacks=[Losses()])
    with tr.ema_weights(trainer.optimizer, trainer.trainable_variables):
        ema = {k: v for k, v in lora.lora_state(layers).items()}
    np.savez(folder / f"{name}.ema.npz", **ema)
    lora.save_lora(folder / f"{name}.lora.safetensors", layers, SPEC)
    out = {"losses": losses, "skipped": int(trainer.skipped_steps.numpy()),
           "optimizer_steps": int(keras.ops.convert_to_numpy(trainer.optimizer.iterations)),
           **{m: m in sys.modules for m in ("tensorflow", "keras_cv", "torch")}}
    (folder / f"{name}.json").write_text(json.dumps(out))
    return out


def assert_same_training(start: dict, want: dict, got: dict, ema_want, ema_got) -> None:
    """Two runs of this case trained alike: each LoRA matrix moved, and the updates agree in norm
    to 1e-4 and element by element to 2e-3 of the largest one, the EMA alike. Adam divides each
    gradient by its own running size, which magnifies float32 rounding (another backend, or a
    batch summed over devices in another order) in the few gradients near its epsilon (1e-7)."""
    for key in start:
        moved = np.abs(want[key] - start[key]).max()
        assert moved > 1e-4, key  # the run trained
        d_got, d_want = got[key] - start[key], want[key] - start[key]
        assert np.linalg.norm(d_got - d_want) <= 1e-4 * np.linalg.norm(d_want), key
        np.testing.assert_allclose(d_got, d_want, atol=2e-3 * moved, err_msg=key)
        np.testing.assert_allclose(ema_got[key], ema_want[key], atol=2e-3 * moved, err_msg=key)


if __name__ == "__main__":
    run_case(Path(sys.argv[1]), *sys.argv[2:3])
