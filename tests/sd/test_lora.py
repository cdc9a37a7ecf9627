"""LoRA on the attention projections, on a tiny denoiser made of KerasCV's SpatialTransformer."""

import numpy as np
import pytest
from tiny import tiny_unet

from fashion_sd.config import LoraConfig
from fashion_sd.sd import lora, lora_file
from fashion_sd.sd.lora import LoraError

TARGETS = ["to_q", "to_k", "to_v", "out_proj"]


def inputs(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, 8, 8, 4)).astype("float32"),
            rng.standard_normal((batch, 320)).astype("float32"),
            rng.standard_normal((batch, 77, 768)).astype("float32")]


def randomise_b(layers, seed=0, scale=0.05):
    rng = np.random.default_rng(seed)
    for layer in layers.values():
        layer.lora_kernel_b.assign(rng.standard_normal(layer.lora_kernel_b.shape).astype("float32") * scale)


def test_projection_names_are_stable():
    names = list(lora.attention_projections(tiny_unet()))
    assert len(names) == 16
    assert names[:4] == ["st00.attn1.to_q", "st00.attn1.to_k", "st00.attn1.to_v", "st00.attn1.out_proj"]
    assert names[-1] == "st01.attn2.out_proj"
    assert names == list(lora.attention_projections(tiny_unet()))  # another process, same names


def test_only_lora_trains_with_the_expected_count():
    model = tiny_unet()
    layers = lora.apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
    # rank * (fan_in + fan_out): self-attention 32x32, cross-attention k/v 768x32
    per_block = 4 * ((32 + 32) * 6 + (768 + 32) * 2)
    assert lora.lora_parameter_count(layers, 4) == 2 * per_block
    names = sorted(v.path.rsplit("/", 1)[-1] for v in model.trainable_weights)
    assert set(names) == {"lora_kernel_a", "lora_kernel_b"}
    assert sum(int(np.prod(v.shape)) for v in model.trainable_weights) == 2 * per_block
    out_proj = layers["st00.attn1.out_proj"]
    assert not out_proj.bias.trainable and not out_proj._kernel.trainable


def test_targets_select_by_suffix():
    layers = lora.apply_lora(tiny_unet(), LoraConfig(rank=2, alpha=2.0, targets=["attn2.to_k", "attn2.to_v"]))
    assert sorted(layers) == ["st00.attn2.to_k", "st00.attn2.to_v", "st01.attn2.to_k",
                              "st01.attn2.to_v"]
    with pytest.raises(LoraError, match="'to_x'.*match no attention projection"):
        lora.apply_lora(tiny_unet(), LoraConfig(rank=2, alpha=2.0, targets=["to_q", "to_x"]))


def test_enabling_lora_changes_nothing_until_trained():
    model = tiny_unet()
    x = inputs()
    before = np.asarray(model(x))
    layers = lora.apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
    np.testing.assert_array_equal(np.asarray(model(x)), before)
    randomise_b(layers)
    assert np.abs(np.asarray(model(x)) - before).max() > 1e-3


def test_save_load_round_trip(tmp_path):
    a = tiny_unet()
    la = lora.apply_lora(a, LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
    randomise_b(la)
    path = lora.save_lora(tmp_path / "x.lora.safetensors", la, LoraConfig(rank=4, alpha=8.0, targets=TARGETS),
                          base_weights="random-init(seed=1)", resolution="64")
    b = tiny_unet()
    lb = lora.apply_lora(b, LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
    meta = lora.load_lora(path, lb)
    assert meta["base_weights"] == "random-init(seed=1)" and meta["rank"] == "4"
    for key in la:
        np.testing.assert_array_equal(la[key].lora_kernel_a.numpy(), lb[key].lora_kernel_a.numpy())
        np.testing.assert_array_equal(la[key].lora_kernel_b.numpy(), lb[key].lora_kernel_b.numpy())
    assert not list(tmp_path.glob("*.tmp"))


def test_loading_into_other_rank_or_targets_is_a_clear_error(tmp_path):
    la = lora.apply_lora(tiny_unet(), LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
    path = lora.save_lora(tmp_path / "x.lora.safetensors", la, LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
    with pytest.raises(LoraError, match="rank 4, but the model's LoRA has rank 2.*lora.rank: 4"):
        lora.load_lora(path, lora.apply_lora(tiny_unet(), LoraConfig(rank=2, alpha=8.0, targets=TARGETS)))
    with pytest.raises(LoraError, match="trained on targets.*16 layers.*8 LoRA layers"):
        lora.load_lora(path, lora.apply_lora(tiny_unet(), LoraConfig(rank=4, alpha=8.0, targets=["to_q", "to_v"])))


def test_unreadable_or_foreign_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(LoraError, match="not a readable safetensors"):
        lora_file.read(bad)
    from safetensors.numpy import save_file

    save_file({"lora_unet_x.lora_down.weight": np.zeros((4, 4), np.float32)}, str(tmp_path / "k.safetensors"))
    with pytest.raises(LoraError, match="not a fashion-sd LoRA"):
        lora_file.read(tmp_path / "k.safetensors")
    with pytest.raises(LoraError, match="not found"):
        lora_file.read(tmp_path / "missing.safetensors")


def test_merged_equals_unmerged(tmp_path):
    import keras

    keras.utils.set_random_seed(3)
    trained = tiny_unet()
    base = np.asarray(trained.get_weights(), dtype=object)
    layers = lora.apply_lora(trained, LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
    randomise_b(layers, seed=5)
    path = lora.save_lora(tmp_path / "x.lora.safetensors", layers, LoraConfig(rank=4, alpha=8.0, targets=TARGETS))
    plain = tiny_unet()
    plain.set_weights(list(base))
    lora.merge_lora(plain, path)
    x = inputs(seed=7)
    unmerged, merged = np.asarray(trained(x)), np.asarray(plain(x))
    np.testing.assert_allclose(merged, unmerged, atol=1e-5 * np.abs(unmerged).max())
    with pytest.raises(LoraError, match="without LoRA"):
        lora.merge_lora(trained, path)
