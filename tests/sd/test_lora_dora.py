"""DoRA (``lora.type: dora``) on the tiny denoiser, without torch: what it trains, that enabling it
changes nothing, its checkpoint (bit-exact round trip, the validator), merging equal to the
unmerged layers, and a DoRA run started from a plain LoRA. PEFT equality: tests/interop/test_dora.py.
"""

import keras
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_lora import TARGETS, inputs, randomise_b
from tiny import tiny_unet

from fashion_sd.config import LoraConfig
from fashion_sd.sd import lora, lora_file
from fashion_sd.sd.lora import LoraError

DORA = LoraConfig(rank=4, alpha=8.0, targets=TARGETS, type="dora")


def randomise_m(layers, seed=1, spread=0.2):
    """Magnitudes away from their start, so DoRA differs from the LoRA of the same A and B."""
    rng = np.random.default_rng(seed)
    for layer in layers.values():
        m = layer.dora_magnitude
        m.assign(m.numpy() * (1 + spread * rng.standard_normal(m.shape)).astype("float32"))


def trained_dora(seed=0, spec=DORA, model=None):
    model = model or tiny_unet()
    layers = lora.apply_lora(model, spec)
    randomise_b(layers, seed=seed)
    randomise_m(layers, seed=seed + 1)
    return model, layers


@pytest.mark.parametrize("form", ["separate", "merged"])
def test_dora_trains_a_b_and_m_and_starts_as_the_base(form):
    model = tiny_unet()
    x = inputs()
    before = np.asarray(model(x))
    spec = LoraConfig(rank=4, alpha=8.0, targets=TARGETS, type="dora", form=form)
    layers = lora.apply_lora(model, spec)
    names = {v.path.rsplit("/", 1)[-1] for v in model.trainable_weights}
    assert names == {"lora_kernel_a", "lora_kernel_b", "dora_magnitude"}
    per_block = 4 * ((32 + 32) * 6 + (768 + 32) * 2) + 8 * 32  # + one m per output channel
    assert lora.lora_parameter_count(layers, 4, dora=True) == 2 * per_block
    assert sum(int(np.prod(v.shape)) for v in model.trainable_weights) == 2 * per_block
    assert len(lora.lora_variables(layers)) == 3 * len(layers)
    layer = layers["st00.attn2.to_k"]
    np.testing.assert_allclose(layer.dora_magnitude.numpy(),
                               np.linalg.norm(layer._kernel.numpy().astype(np.float64), axis=0),
                               rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(model(x)), before)  # m / ||W|| is exactly 1
    randomise_b(layers)
    assert np.abs(np.asarray(model(x)) - before).max() > 1e-3


def test_lora_type_lora_is_unchanged():
    """The default type computes what it did before DoRA existed (the same seed, bit for bit)."""
    keras.utils.set_random_seed(4)
    a = tiny_unet()
    la = lora.apply_lora(a, LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
    assert not any(hasattr(layer, "dora_magnitude") for layer in la.values())
    assert LoraConfig().type == "lora"
    assert LoraConfig.from_meta({"rank": "4", "alpha": "8.0", "targets": "[]"}).type == "lora"


def test_save_load_round_trip_is_bit_exact(tmp_path):
    _, la = trained_dora()
    path = lora.save_lora(tmp_path / "d.lora.safetensors", la, DORA, base_weights="random")
    meta = lora_file.check(path, fits_model=False)
    assert meta["type"] == "dora"
    tensors = load_file(str(path))
    assert tensors["st00.attn1.to_q.dora_m"].shape == (32,)
    _, lb = trained_dora(seed=7)
    lora.load_lora(path, lb)
    for key in la:
        for name in ("lora_kernel_a", "lora_kernel_b", "dora_magnitude"):
            np.testing.assert_array_equal(getattr(la[key], name).numpy(),
                                          getattr(lb[key], name).numpy())
    assert lora.lora_state(lb).keys() == tensors.keys()


def test_types_do_not_mix(tmp_path):
    _, dora_layers = trained_dora()
    plain = lora.apply_lora(tiny_unet(), LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
    d = lora.save_lora(tmp_path / "d.lora.safetensors", dora_layers, DORA)
    p = lora.save_lora(tmp_path / "p.lora.safetensors", plain, LoraConfig(rank=4, alpha=8.0))
    with pytest.raises(LoraError, match="a DORA checkpoint, the model's layers are LORA; set lora.type: dora"):
        lora.load_lora(d, plain)
    with pytest.raises(LoraError, match="a LORA checkpoint.*set lora.type: lora"):
        lora.load_lora(p, dora_layers)
    with pytest.raises(LoraError, match="lora.type is lora, the layers are dora"):
        lora.save_lora(tmp_path / "x.lora.safetensors", dora_layers, LoraConfig(rank=4, alpha=8.0))
    with pytest.raises(LoraError, match="lora.init_from: .*is a DoRA, the run has lora.type lora; set lora.type: dora"):
        lora.init_from(d, plain, LoraConfig(rank=4, alpha=8.0))
    with pytest.raises(LoraError, match="is a DoRA.*set lora.type: dora"):  # before any model
        lora_file.check_init_from(d, 4, 8.0, "lora")
    assert lora_file.check_init_from(p, 4, 8.0, "dora")["type"] == "lora"


def test_the_validator_takes_dora_m_only_in_a_dora_file(tmp_path):
    _, layers = trained_dora()
    path = lora.save_lora(tmp_path / "d.lora.safetensors", layers, DORA)
    tensors = load_file(str(path))
    meta = lora_file.safetensors_header(path)[1]

    def write(name, t, m):
        save_file(t, str(tmp_path / name), metadata=m)
        return tmp_path / name

    as_lora = write("a.safetensors", tensors, {**meta, "type": "lora"})
    with pytest.raises(LoraError, match="holds DoRA's magnitude 'st00.*dora_m' but its metadata says type 'lora'"):
        lora_file.check(as_lora, fits_model=False)
    untyped = write("b.safetensors", tensors, {k: v for k, v in meta.items() if k != "type"})
    with pytest.raises(LoraError, match="metadata says type 'lora'"):
        lora_file.check(untyped, fits_model=False)
    missing = write("c.safetensors", {k: v for k, v in tensors.items() if k != "st01.attn2.to_v.dora_m"}, meta)
    with pytest.raises(LoraError, match=r"DoRA layer st01.attn2.to_v needs dora_m of shape \(32,\), it has none"):
        lora_file.check(missing, fits_model=False)
    bad = write("d.safetensors", {**tensors, "st00.attn1.to_q.dora_m": np.ones(31, np.float32)}, meta)
    with pytest.raises(LoraError, match=r"needs dora_m of shape \(32,\), it has \(31,\)"):
        lora_file.check(bad, fits_model=False)
    other = write("e.safetensors", tensors, {**meta, "type": "lokr"})
    with pytest.raises(LoraError, match="metadata type 'lokr' is neither of lora, dora"):
        lora_file.check(other, fits_model=False)
    nan = write("f.safetensors", {**tensors, "st00.attn1.to_q.dora_m": np.full(32, np.nan, np.float32)}, meta)
    with pytest.raises(LoraError, match="not finite"):
        lora_file.check(nan, fits_model=False)


@pytest.mark.parametrize("form", ["separate", "merged"])
def test_merged_equals_unmerged(tmp_path, form):
    keras.utils.set_random_seed(3)
    model = tiny_unet()
    base = list(model.get_weights())
    spec = LoraConfig(rank=4, alpha=8.0, targets=TARGETS, type="dora", form=form)
    _, layers = trained_dora(spec=spec, model=model)
    path = lora.save_lora(tmp_path / "d.lora.safetensors", layers, spec)
    plain = tiny_unet()
    plain.set_weights(base)
    x = inputs(seed=7)
    without = np.asarray(plain(x))
    lora.merge_lora(plain, path)
    unmerged, merged = np.asarray(model(x)), np.asarray(plain(x))
    assert np.abs(unmerged - without).max() > 1e-2 * np.abs(unmerged).max()  # DoRA does something
    np.testing.assert_allclose(merged, unmerged, atol=1e-5 * np.abs(unmerged).max())


def test_a_swap_folds_each_dora_into_the_base_kernel(tmp_path):
    """The app computes the next file's changes while the last one is folded in: a DoRA's
    change depends on the kernel, so it must be taken from the base one."""
    keras.utils.set_random_seed(3)
    model = tiny_unet()
    base = list(model.get_weights())
    paths = []
    for seed in (0, 10):
        _, layers = trained_dora(seed=seed)
        paths.append(lora.save_lora(tmp_path / f"{seed}.lora.safetensors", layers, DORA))
    plain = tiny_unet()
    plain.set_weights(base)
    swap = lora.LoraSwap()
    first, _ = lora.lora_deltas(paths[0], plain)
    swap.apply(first)
    second, _ = lora.lora_deltas(paths[1], plain)  # computed while the first is applied
    swap.apply(second, 0.5)
    fresh = tiny_unet()
    fresh.set_weights(base)
    alone, _ = lora.lora_deltas(paths[1], fresh)
    for (_, d1), (_, d2) in zip(second, alone):
        np.testing.assert_array_equal(d1, d2)
    swap.reset()
    for v, b in zip(plain.get_weights(), base):
        np.testing.assert_array_equal(v, b)
    # nothing of this model is left recorded as swapped (other tests' swaps may still be live)
    assert not any(id(v) in lora._SWAPPED for v in plain.weights)


def test_a_dora_run_starts_from_a_plain_lora_as_that_lora(tmp_path):
    keras.utils.set_random_seed(5)
    model = tiny_unet()
    base = list(model.get_weights())
    plain_layers = lora.apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
    randomise_b(plain_layers, seed=2)
    x = inputs(seed=3)
    expected = np.asarray(model(x))
    path = lora.save_lora(tmp_path / "p.lora.safetensors", plain_layers, LoraConfig(rank=4, alpha=8.0))
    fresh = tiny_unet()
    fresh.set_weights(base)
    layers = lora.apply_lora(fresh, DORA)
    lora.init_from(path, layers, DORA)
    np.testing.assert_allclose(np.asarray(fresh(x)), expected, atol=1e-5 * np.abs(expected).max())
    for key, layer in layers.items():
        np.testing.assert_array_equal(layer.lora_kernel_b.numpy(), plain_layers[key].lora_kernel_b.numpy())
        full = layer._kernel.numpy().astype(np.float64) + 2.0 * (
            layer.lora_kernel_a.numpy().astype(np.float64) @ layer.lora_kernel_b.numpy())
        np.testing.assert_allclose(layer.dora_magnitude.numpy(), np.linalg.norm(full, axis=0), rtol=1e-5)


def test_train_state_tensors_round_trip_through_set_lora_state():
    """What the trainer's train state needs: lora_state under a prefix back into fresh layers."""
    _, la = trained_dora()
    state = {f"lora/{k}": v for k, v in lora.lora_state(la).items()}
    _, lb = trained_dora(seed=9)
    lora.set_lora_state(lb, state, prefix="lora/")
    for key in la:
        np.testing.assert_array_equal(la[key].dora_magnitude.numpy(), lb[key].dora_magnitude.numpy())
    del state["lora/st00.attn1.to_q.dora_m"]
    with pytest.raises(LoraError, match="st00.attn1.to_q.dora_m is missing"):
        lora.set_lora_state(lb, state, prefix="lora/")


def test_optimizer_state_and_lora_state_resume_bit_for_bit():
    """What a train state holds (lora_state, the trainer's AdamW variables) continues a DoRA run
    exactly: two steps, saved, restored into a fresh model and optimizer, one more step on each.
    (The trainer's load_train_state must restore through set_lora_state for m to come back.)"""
    import tensorflow as tf

    from fashion_sd.config import TrainConfig
    from fashion_sd.training.trainer import make_optimizer

    keras.utils.set_random_seed(11)
    model = tiny_unet()
    base = list(model.get_weights())
    x = inputs(seed=4)
    target = np.random.default_rng(5).standard_normal(np.asarray(model(x)).shape).astype("float32")

    def start(m):
        layers = lora.apply_lora(m, DORA)
        opt = make_optimizer(TrainConfig(learning_rate=1e-3), 100, "float32")
        opt.build(m.trainable_weights)
        return layers, opt

    def step(m, opt):
        with tf.GradientTape() as tape:
            loss = keras.ops.mean(keras.ops.square(m(x) - target))
        opt.apply(tape.gradient(loss, m.trainable_weights), m.trainable_weights)

    layers, opt = start(model)
    randomise_b(layers)
    for _ in range(2):
        step(model, opt)
    state, store = lora.lora_state(layers), {}
    opt.save_own_variables(store)
    fresh = tiny_unet()
    fresh.set_weights(base)
    layers2, opt2 = start(fresh)
    lora.set_lora_state(layers2, state)
    opt2.load_own_variables(store)
    step(model, opt)
    step(fresh, opt2)
    moved = lora.lora_state(layers)
    assert np.any(moved["st00.attn1.to_q.dora_m"] != state["st00.attn1.to_q.dora_m"])
    for key, value in lora.lora_state(layers2).items():
        np.testing.assert_array_equal(value, moved[key], err_msg=key)
