"""The bridge's names, refusals and plumbing, without torch and without full-size models: key
tables, bf16 reading, refusing SD 2.x / SDXL / LyCORIS by name, errors that list every bad tensor,
per-layer alphas, lora.init_from and output.export in a real (tiny) training run, convert.py."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from safetensors.numpy import load_file, save_file
from tiny import tiny_unet

from fashion_sd.config import LoraConfig
from fashion_sd.interop import kerascv
from fashion_sd.interop import keys as K
from fashion_sd.interop.checkpoint import open_source
from fashion_sd.interop.lora_formats import export_lora, import_lora
from fashion_sd.interop.tensors import InteropError, SafetensorsFile
from fashion_sd.interop.weights import import_model
from fashion_sd.sd import lora, lora_file, models


def test_compvis_names_round_trip_and_cover_the_unet_once():
    names = kerascv.unet_block_names()
    inner = {"res": ["in_layers.0.weight", "emb_layers.1.bias", "out_layers.3.weight",
                     "skip_connection.weight"],
             "st": ["transformer_blocks.0.attn2.to_k.weight", "proj_in.bias"]}
    seen = set()
    for kind in ("res", "st"):
        for block in names[kind]:
            for rest in inner[kind]:
                d = K.compvis_unet_key(K._rename(f"{block}.x", K.UNET_BLOCKS, False)[:-2] + "." + rest)
                assert d.startswith(block + ".") and d not in seen
                seen.add(d)
    assert K.compvis_unet_key("input_blocks.1.0.in_layers.0.weight") == "down_blocks.0.resnets.0.norm1.weight"
    assert K.compvis_unet_key("output_blocks.2.1.conv.weight") == "up_blocks.0.upsamplers.0.conv.weight"
    assert K.compvis_unet_key("output_blocks.5.2.conv.bias") == "up_blocks.1.upsamplers.0.conv.bias"
    assert K.compvis_unet_key("input_blocks.9.0.op.weight") == "down_blocks.2.downsamplers.0.conv.weight"
    assert K.compvis_unet_key("middle_block.1.proj_out.weight") == "mid_block.attentions.0.proj_out.weight"
    assert K.compvis_vae_key("decoder.up.3.block.0.nin_shortcut.weight") == "decoder.up_blocks.0.resnets.0.conv_shortcut.weight"
    assert K.compvis_vae_key("encoder.mid.attn_1.proj_out.bias") == "encoder.mid_block.attentions.0.to_out.0.bias"
    assert K.diffusers_vae_key("decoder.mid_block.attentions.0.proj_attn.weight") == "decoder.mid_block.attentions.0.to_out.0.weight"
    assert K.ema_key("input_blocks.1.0.in_layers.0.weight") == "model_ema.diffusion_modelinput_blocks10in_layers0weight"


def test_vae_parts_of_kerascv_map_one_to_one(small_parts):
    for name in ("image_encoder", "decoder", "text_encoder"):
        targets = kerascv.TARGETS[name](small_parts[name])
        variables = {id(t.variable) for t in targets}
        assert len(variables) == len(targets) == len(small_parts[name].weights), name


def write_bf16(path, tensors: dict[str, np.ndarray]):
    """A bf16 safetensors file written by hand (numpy has no bfloat16): the top 16 bits."""
    header, blobs, offset = {}, [], 0
    for k, v in tensors.items():
        raw = (np.ascontiguousarray(v, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[k] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_bf16_tensors_widen_exactly(tmp_path):
    x = np.array([[1.0, -2.5], [3.140625, 1e-3]], np.float32)
    write_bf16(tmp_path / "a.safetensors", {"x": x})
    got = SafetensorsFile(tmp_path / "a.safetensors")["x"]
    assert got.dtype == np.float32
    expected = (x.view(np.uint32) & 0xFFFF0000).view(np.float32)  # bf16 truncation of x
    np.testing.assert_array_equal(got, expected)


def test_decoder_from_bf16_diffusers_folder_equals_source(small_parts, tmp_path):
    decoder = small_parts["decoder"]
    state = kerascv.state_dict(kerascv.decoder_targets(decoder))
    (tmp_path / "sd" / "vae").mkdir(parents=True)
    encoder_state = kerascv.state_dict(kerascv.image_encoder_targets(small_parts["image_encoder"]))
    write_bf16(tmp_path / "sd/vae/diffusion_pytorch_model.safetensors", {**state, **encoder_state})
    built = models.build_component("decoder", 64)
    summary = import_model(tmp_path / "sd", tmp_path / "out",
                           built={"decoder": built, "image_encoder": models.build_component("image_encoder", 64)})
    assert summary["absent"] == ["diffusion_model", "text_encoder"]
    assert summary["source_dtypes"]["decoder"] == ["BF16"]
    for ours, theirs in zip(built.weights, decoder.weights):
        expected = (np.asarray(theirs.numpy(), np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
        np.testing.assert_array_equal(ours.numpy(), expected)


def test_one_bad_component_means_no_file_is_written(small_parts, tmp_path):
    state = {**kerascv.state_dict(kerascv.decoder_targets(small_parts["decoder"])),
             **kerascv.state_dict(kerascv.image_encoder_targets(small_parts["image_encoder"]))}
    state.pop("decoder.conv_out.bias")  # the decoder is bad; the encoder, converted first, is fine
    (tmp_path / "sd" / "vae").mkdir(parents=True)
    save_file(state, str(tmp_path / "sd/vae/diffusion_pytorch_model.safetensors"))
    with pytest.raises(InteropError, match=r"sd \(decoder\): .*1 missing: decoder.conv_out.bias"):
        import_model(tmp_path / "sd", tmp_path / "out", built={
            "decoder": models.build_component("decoder", 64),
            "image_encoder": models.build_component("image_encoder", 64)})
    assert not (tmp_path / "out").exists()


def test_unmapped_missing_and_misshaped_tensors_are_listed_together(small_parts):
    state = kerascv.state_dict(kerascv.decoder_targets(small_parts["decoder"]))
    state.pop("decoder.conv_in.bias")
    state["decoder.extra.weight"] = np.zeros(3, np.float32)
    state["decoder.conv_out.weight"] = np.zeros((3, 128, 5, 5), np.float32)
    with pytest.raises(InteropError) as err:
        kerascv.assign(kerascv.decoder_targets(models.build_component("decoder", 64)),
                       kerascv.DictSource(state), "vae.safetensors (decoder)")
    msg = str(err.value)
    assert msg.startswith("vae.safetensors (decoder): tensors do not match SD 1.x")
    assert "1 missing: decoder.conv_in.bias" in msg and "1 unmapped: decoder.extra.weight" in msg
    assert "1 mis-shaped: decoder.conv_out.weight (3, 128, 5, 5) (KerasCV expects (3, 3, 128, 3))" in msg


@pytest.mark.parametrize("keys,match", [
    ({"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3, 2)},
     r"Stable Diffusion 2\.x checkpoint .*OpenCLIP"),
    ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (4,)}, "an SDXL checkpoint"),
    ({K.UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
     r"1024-wide text features"),
    ({"model.diffusion_model.label_emb.0.0.weight": (2, 2)}, r"1 tensors belong to no SD 1\.x component"),
])
def test_other_models_are_refused_by_name(tmp_path, keys, match):
    path = tmp_path / "model.safetensors"
    save_file({k: np.zeros(s, np.float16) for k, s in keys.items()}, str(path))
    with pytest.raises(InteropError, match=match) as err:
        import_model(path, tmp_path / "out")
    assert str(path) in str(err.value) and not (tmp_path / "out").exists()


def test_diffusers_folders_of_other_models_are_refused(tmp_path):
    (tmp_path / "sd2" / "unet").mkdir(parents=True)
    (tmp_path / "sd2/unet/config.json").write_text(json.dumps({"cross_attention_dim": 1024}))
    with pytest.raises(InteropError, match=r"Stable Diffusion 2\.x model .*cross_attention_dim 1024"):
        import_model(tmp_path / "sd2", tmp_path / "out")
    (tmp_path / "xl" / "text_encoder_2").mkdir(parents=True)
    (tmp_path / "xl/model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(InteropError, match="SDXL pipeline"):
        import_model(tmp_path / "xl", tmp_path / "out")


def test_ema_weights_are_chosen_by_flag(tmp_path):
    plain = K.UNET_PREFIX + "out.2.bias"
    path = tmp_path / "ema.safetensors"
    save_file({plain: np.zeros(4, np.float32), K.ema_key("out.2.bias"): np.ones(4, np.float32),
               "model_ema.num_updates": np.zeros((), np.int32)}, str(path))
    src = open_source(path)
    assert src.parts["diffusion_model"]["conv_out.bias"].tolist() == [0, 0, 0, 0]
    assert src.skipped["EMA copy of the U-Net (import it with --ema)"] == ["model_ema.diffusion_modelout2bias"]
    src = open_source(path, ema=True)
    assert src.parts["diffusion_model"]["conv_out.bias"].tolist() == [1, 1, 1, 1]
    save_file({plain: np.zeros(4, np.float32)}, str(path))
    with pytest.raises(InteropError, match="no EMA weights"):
        open_source(path, ema=True)


# --------------------------------------------------------------------------------------------
# LoRA files


def kohya_file(path, modules: dict[str, tuple[int, int]], rank=2, alphas=None, extra=None, seed=0):
    rng = np.random.default_rng(seed)
    t = {}
    for i, (m, (out_dim, in_dim)) in enumerate(modules.items()):
        t[f"{m}.lora_down.weight"] = rng.standard_normal((rank, in_dim)).astype(np.float32)
        t[f"{m}.lora_up.weight"] = rng.standard_normal((out_dim, rank)).astype(np.float32)
        if alphas is not None:
            t[f"{m}.alpha"] = np.asarray(alphas[i], np.float32)
    t.update(extra or {})
    save_file(t, str(path), metadata={"ss_network_dim": str(rank)})
    return t


TINY_MODULES = {  # the tiny U-Net's first transformer is named like SD's first (32 channels)
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (32, 768),
    "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_out_0": (32, 32),  # CompVis naming
}


def test_kohya_import_keeps_per_layer_alpha_and_deltas_follow_it(tmp_path):
    src = kohya_file(tmp_path / "k.safetensors", TINY_MODULES, rank=2, alphas=[1.0, 4.0, 1.0])
    meta = import_lora(tmp_path / "k.safetensors", tmp_path / "k.lora.safetensors")
    assert meta["rank"] == "2" and meta["alpha"] == "1.0" and meta["imported_format"] == "kohya"
    assert json.loads(meta["layer_alpha"])["st00.attn2.to_k"] == 4.0
    assert json.loads(meta["targets"]) == ["st00.attn1.to_q", "st00.attn2.to_k", "st00.attn1.out_proj"]
    model = tiny_unet()
    deltas, _ = lora.lora_deltas(tmp_path / "k.lora.safetensors", model)
    by_var = {id(v): d for v, d in deltas}
    proj = lora.attention_projections(model)
    for kohya, ours, alpha in ((list(TINY_MODULES)[1], "st00.attn2.to_k", 4.0),
                               (list(TINY_MODULES)[2], "st00.attn1.out_proj", 1.0)):
        torch_delta = alpha / 2 * src[f"{kohya}.lora_up.weight"].astype(np.float64) @ src[f"{kohya}.lora_down.weight"]
        np.testing.assert_allclose(by_var[id(proj[ours].kernel)], torch_delta.T, rtol=1e-6)
    # exported back, each module keeps its own alpha and its tensors bit for bit
    back = load_file(str(export_lora(tmp_path / "k.lora.safetensors", "kohya", tmp_path / "b.safetensors")))
    # (the CompVis-named module comes back under diffusers' name, which A1111 and ComfyUI read too)
    assert back.keys() == {k.replace("input_blocks_1_1", "down_blocks_0_attentions_0") for k in src}
    m = list(TINY_MODULES)[1]
    np.testing.assert_array_equal(back[f"{m}.lora_down.weight"], src[f"{m}.lora_down.weight"])
    assert float(back[f"{m}.alpha"]) == 4.0


def test_missing_alpha_means_alpha_equals_rank(tmp_path):
    kohya_file(tmp_path / "k.safetensors", dict(list(TINY_MODULES.items())[:1]), rank=3)
    assert import_lora(tmp_path / "k.safetensors", tmp_path / "o.lora.safetensors")["alpha"] == "3.0"


@pytest.mark.parametrize("extra,match", [
    ({"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": np.zeros((2, 320, 3, 3), np.float32),
      "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": np.zeros((320, 2, 1, 1), np.float32)},
     r"convolution LoRA \(LoCon\) on lora_unet_down_blocks_0_resnets_0_conv1"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": np.zeros((2, 2), np.float32)},
     r"LyCORIS tensors \(lora_unet_down_blocks_0_attentions_0_proj_in\.hada_w1_a"),
    ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2.lora_down.weight": np.zeros((2, 1280), np.float32),
      "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2.lora_up.weight": np.zeros((320, 2), np.float32)},
     r"1 LoRA modules fashion-sd cannot apply: lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"),
    ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((2, 768), np.float32)},
     "an SDXL LoRA"),
])
def test_lora_kinds_fashion_sd_cannot_apply_are_named(tmp_path, extra, match):
    kohya_file(tmp_path / "k.safetensors", dict(list(TINY_MODULES.items())[:1]), extra=extra)
    with pytest.raises(InteropError, match=match):
        import_lora(tmp_path / "k.safetensors", tmp_path / "o.lora.safetensors")
    assert not (tmp_path / "o.lora.safetensors").exists()


def test_text_encoder_layers_need_the_text_encoder(tmp_path, small_parts):
    kohya_file(tmp_path / "te.safetensors", {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
        "lora_te_text_model_encoder_layers_11_mlp_fc2": (768, 3072),
        **dict(list(TINY_MODULES.items())[:1])})
    import_lora(tmp_path / "te.safetensors", tmp_path / "te.lora.safetensors")
    with pytest.raises(lora.LoraError, match=r"2 text-encoder layers .* pass the text encoder"):
        lora.lora_deltas(tmp_path / "te.lora.safetensors", tiny_unet())
    deltas, _ = lora.lora_deltas(tmp_path / "te.lora.safetensors", tiny_unet(),
                                 text_encoder=small_parts["text_encoder"])
    assert sorted(tuple(d.shape) for _, d in deltas) == [(32, 32), (768, 768), (3072, 768)]


def test_init_from_checks_rank_alpha_and_text_encoder_parts(tmp_path):
    model = tiny_unet()
    layers = lora.apply_lora(model, LoraConfig(rank=2, alpha=2.0, targets=["to_q", "to_k", "to_v", "out_proj"]))
    for layer in layers.values():
        layer.lora_kernel_b.assign(np.full(layer.lora_kernel_b.shape, 0.25, np.float32))
    lora.save_lora(tmp_path / "a.lora.safetensors", layers, LoraConfig(rank=2, alpha=2.0, targets=["to_q", "to_k", "to_v", "out_proj"]))
    with pytest.raises(lora.LoraError, match="rank 2, the run has lora.rank 4; set lora.rank: 2"):
        lora_file.check_init_from(tmp_path / "a.lora.safetensors", 4, 2.0)
    with pytest.raises(lora.LoraError, match="alpha 2.0, the run has lora.alpha 8.0; set lora.alpha: 2.0"):
        lora_file.check_init_from(tmp_path / "a.lora.safetensors", 2, 8.0)
    fresh = lora.apply_lora(tiny_unet(), LoraConfig(rank=2, alpha=2.0, targets=["to_q", "to_k", "to_v", "out_proj"]))
    lora.init_from(tmp_path / "a.lora.safetensors", fresh, LoraConfig(rank=2, alpha=2.0))
    assert all(np.all(layer.lora_kernel_b.numpy() == 0.25) for layer in fresh.values())
    kohya_file(tmp_path / "te.safetensors", {"lora_te_text_model_encoder_layers_0_mlp_fc1": (3072, 768)})
    import_lora(tmp_path / "te.safetensors", tmp_path / "te.lora.safetensors")
    with pytest.raises(lora.LoraError, match="text-encoder layers"):
        lora_file.check_init_from(tmp_path / "te.lora.safetensors", 2, 2.0)


# --------------------------------------------------------------------------------------------
# Training: output.export beside every checkpoint, lora.init_from as the start


def test_a_run_exports_its_checkpoints_and_starts_from_an_imported_lora(tmp_path, demo_captions,
                                                                       encoder_cache, small_parts):
    from fashion_sd.config import load_config
    from fashion_sd.training import run

    def build(source, resolution):
        return models.Components(source, resolution, diffusion_model=tiny_unet(resolution // 8),
                                 **small_parts)

    def cfg(name, *extra):
        return load_config(ROOT / "configs/demo.yaml", [
            f"data.captions={demo_captions}", f"data.cache_dir={encoder_cache}",
            f"output.dir={tmp_path / name}", "model.weights=random", "train.batch_size=4",
            "train.sample_every=0", "train.epochs=1", "train.max_steps=2", *extra])

    run.train(cfg("a", "output.export=[kohya, diffusers]"), progress=None, verbose=0, build=build)
    ck = tmp_path / "a" / "checkpoints"
    assert {p.name for p in ck.glob("last.*")} == {
        "last.lora.safetensors", "last.kohya.safetensors", "last.diffusers.safetensors",
        "last.README.md"}  # no grid to copy beside the card: train.sample_every=0
    kohya = load_file(str(ck / "last.kohya.safetensors"))
    assert kohya["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"] == 8.0
    # the kohya file, imported, starts a new run exactly where the first one stopped
    import_lora(ck / "last.kohya.safetensors", tmp_path / "start.lora.safetensors")
    trained = load_file(str(ck / "last.lora.safetensors"))
    with pytest.raises(run.TrainingError, match="set lora.rank: 4"):
        run.train(cfg("b", f"lora.init_from={tmp_path / 'start.lora.safetensors'}", "lora.rank=8"),
                  progress=None, verbose=0, build=build)
    assert not (tmp_path / "b").exists()  # refused before anything was built or written
    captured = {}

    def build_and_watch(source, resolution):
        comps = build(source, resolution)
        captured["model"] = comps.diffusion_model
        return comps

    c = cfg("c", f"lora.init_from={tmp_path / 'start.lora.safetensors'}", "train.max_steps=1",
            "train.learning_rate=1e-12")
    run.train(c, progress=None, verbose=0, build=build_and_watch)
    start = lora.lora_state(lora.select(lora.attention_projections(captured["model"]), c.lora.targets))
    for k, v in start.items():  # one step at a negligible learning rate: still the imported start
        np.testing.assert_allclose(v, trained[k], atol=1e-6)
    assert lora_file.read(tmp_path / "c/checkpoints/last.lora.safetensors")[1]["init_from"].endswith("start.lora.safetensors")


# --------------------------------------------------------------------------------------------


def convert(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts/convert.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_convert_script_round_trip_and_errors(tmp_path):
    kohya_file(tmp_path / "k.safetensors", dict(list(TINY_MODULES.items())[:2]), rank=2, alphas=[4.0, 4.0])
    r = convert("import-lora", "--from", tmp_path / "k.safetensors", "--out", tmp_path / "k.lora.safetensors")
    assert r.returncode == 0, r.stderr
    assert "kohya LoRA, rank 2, alpha 4.0: 2 U-Net and 0 text-encoder layers" in r.stdout
    r = convert("export-lora", "--lora", tmp_path / "k.lora.safetensors", "--format", "diffusers",
                "--out", tmp_path / "d.safetensors")
    assert r.returncode == 0, r.stderr
    from fashion_sd.interop.tensors import safetensors_header

    _, meta = safetensors_header(tmp_path / "d.safetensors")
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter["unet.r"] == 2 and adapter["unet.lora_alpha"] == 4.0
    r = convert("import-model", "--from", tmp_path / "nothing", "--out", tmp_path / "o")
    assert r.returncode == 2 and "nothing: not found" in r.stderr
    save_file({"conditioner.embedders.0.x": np.zeros(2, np.float16)}, str(tmp_path / "xl.safetensors"))
    r = convert("import-model", "--from", tmp_path / "xl.safetensors", "--out", tmp_path / "o")
    assert r.returncode == 2 and "an SDXL checkpoint" in r.stderr and "Traceback" not in r.stderr
    r = convert("export-lora", "--lora", tmp_path / "k.safetensors", "--format", "kohya", "--out", tmp_path / "x.safetensors")
    assert r.returncode == 2 and "not a fashion-sd LoRA checkpoint" in r.stderr


def test_the_core_package_never_imports_torch():
    code = ("import sys; import fashion_sd.interop, fashion_sd.sd.lora, fashion_sd.training.run, fashion_sd.serving.generate; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stderr


def _our_lora(path, tensors, write=save_file):
    meta = {"format": lora_file.FORMAT, "format_version": str(lora_file.FORMAT_VERSION),
            "rank": "4", "alpha": "4.0", "targets": json.dumps(["to_q"])}
    if write is save_file:
        save_file(tensors, str(path), metadata=meta)
    else:  # write_bf16 takes no metadata: put it in the header by hand
        write(path, tensors)
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = {**json.loads(raw[8:8 + n]), "__metadata__": meta}
        head = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])
    return path


def test_a_bfloat16_lora_exports_as_its_float32_self_and_integers_are_refused(tmp_path):
    """A bfloat16 LoRA (PyTorch's usual) once ended export in a TypeError; an int64 one was
    exported as int64, and a stray 0-d tensor went through unnamed."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((320, 4)).astype(np.float32)
    b = rng.standard_normal((4, 320)).astype(np.float32)
    exact = {k: (v.view(np.uint32) & 0xFFFF0000).view(np.float32)  # what bfloat16 keeps
             for k, v in {"st00.attn1.to_q.lora_a": a, "st00.attn1.to_q.lora_b": b}.items()}
    half = _our_lora(tmp_path / "bf16.lora.safetensors", exact, write=write_bf16)
    full = _our_lora(tmp_path / "f32.lora.safetensors", exact)
    for fmt in ("kohya", "diffusers"):
        one = load_file(str(export_lora(half, fmt, tmp_path / f"h.{fmt}.safetensors")))
        two = load_file(str(export_lora(full, fmt, tmp_path / f"f.{fmt}.safetensors")))
        assert one.keys() == two.keys()
        for k in one:
            assert one[k].dtype == np.float32
            np.testing.assert_array_equal(one[k], two[k])
    ints = _our_lora(tmp_path / "i64.lora.safetensors", {k: np.ones(v.shape, np.int64)
                                                         for k, v in exact.items()})
    with pytest.raises(lora_file.LoraError, match="lora_a holds I64 numbers; a LoRA's matrices are floats"):
        export_lora(ints, "kohya", tmp_path / "i.safetensors")
    stray = _our_lora(tmp_path / "zero.lora.safetensors",
                      {**exact, "st00.attn1.to_q.alpha": np.array(4.0, np.float32)})
    with pytest.raises(lora_file.LoraError, match="holds tensor 'st00.attn1.to_q.alpha'"):
        export_lora(stray, "diffusers", tmp_path / "z.safetensors")
