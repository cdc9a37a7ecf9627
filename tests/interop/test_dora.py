"""DoRA (``lora.type: dora``) against PEFT's own ``use_dora=True`` and diffusers' loaders, float32,
on small random models (no download):

- one layer: the output, the magnitude PEFT starts from, and one step of the trainer's AdamW
  (make_optimizer) changing A, B and m as torch's AdamW changes PEFT's, all to 1e-5;
- the diffusers export loaded by ``pipe.load_lora_weights`` into a small SD 1.x-shaped U-Net and
  CLIP text encoder gives the outputs of the base models with our folded DoRA kernels;
- the kohya export read by diffusers' own kohya conversion is that file again, and its
  ``dora_scale`` is LyCORIS' output-axis magnitude;
- a DoRA that diffusers + PEFT trained and saved imports to a checkpoint whose folded kernels are
  PEFT's merged ones; LyCORIS files import, and export back bit for bit.
"""

import copy
import importlib
import json
import os

import keras
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_lora_init import keras_lora_dense

if os.environ.get("CI"):  # CI installs the interop extra: a missing peer is a failure there
    import torch

    for peer in ("diffusers", "peft"):
        importlib.import_module(peer)
else:
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")

from fashion_sd.config import TrainConfig  # noqa: E402
from fashion_sd.interop import lora_formats as LF  # noqa: E402
from fashion_sd.interop.lora_formats import export_lora, import_lora  # noqa: E402
from fashion_sd.interop.tensors import InteropError  # noqa: E402
from fashion_sd.sd import lora, lora_file  # noqa: E402
from fashion_sd.sd.attention import enable_dora  # noqa: E402
from fashion_sd.training import trainer as tr  # noqa: E402

TOL = 1e-5
MODEL_TOL = 1e-4  # whole models, PEFT's unmerged DoRA against merged kernels (see the test)
FAN_IN, FAN_OUT, RANK, ALPHA = 48, 40, 4, 8.0


def measured(name, ours, theirs, scale=1.0):
    diff = float(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64)).max())
    print(f"\n{name}: max |ours - PEFT| = {diff:.2e}" + ("" if scale == 1.0 else f" (/ {scale:.3g})"))
    return diff / scale


# --------------------------------------------------------------------------------------------
# One layer


def dora_pair(form="separate", seed=0, b_scale=0.3):
    """Our DoRA Dense and PEFT's DoRA Linear holding the same W, bias, A, B and m."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    dense = keras_lora_dense(FAN_IN, FAN_OUT, RANK, ALPHA, "kaiming", seed=seed)
    rng = np.random.default_rng(seed)
    dense.bias.assign(rng.standard_normal(FAN_OUT).astype("float32") * 0.1)
    torch.manual_seed(seed)

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(FAN_IN, FAN_OUT)

        def forward(self, x):
            return self.proj(x)

    base = One()
    with torch.no_grad():  # PEFT takes m from the base weight it wraps: ours, before A and B move
        base.proj.weight.copy_(torch.tensor(dense._kernel.numpy().T))
        base.proj.bias.copy_(torch.tensor(dense.bias.numpy()))
    model = get_peft_model(base, PeftConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"],
                                            lora_dropout=0.0, use_dora=True))
    layer = model.base_model.model.proj
    enable_dora(dense, form)
    peft_start = layer.lora_magnitude_vector["default"].weight.detach().numpy().copy()
    dense.lora_kernel_b.assign(rng.standard_normal((RANK, FAN_OUT)).astype("float32") * b_scale)
    m = dense.dora_magnitude.numpy() * (1 + 0.2 * rng.standard_normal(FAN_OUT)).astype("float32")
    dense.dora_magnitude.assign(m)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor(dense.lora_kernel_a.numpy().T))
        layer.lora_B["default"].weight.copy_(torch.tensor(dense.lora_kernel_b.numpy().T))
        layer.lora_magnitude_vector["default"].weight.copy_(torch.tensor(m))
    return dense, model, layer, peft_start


@pytest.mark.parametrize("form", ["separate", "merged"])
def test_the_layer_is_peft_dora(form):
    dense = keras_lora_dense(FAN_IN, FAN_OUT, RANK, ALPHA, "kaiming")
    enable_dora(dense, form)
    start = dense.dora_magnitude.numpy()
    dense, model, layer, peft_start = dora_pair(form)
    # PEFT starts m at the norms of W + s B A (B = 0: W's rows, torch's dim=1): ours, per column
    assert measured("m at the start", start, peft_start) <= 1e-6 * np.abs(peft_start).max()
    x = np.random.default_rng(1).standard_normal((16, FAN_IN)).astype("float32")
    with torch.no_grad():
        theirs = model(torch.tensor(x)).numpy()
        lora_only = layer.base_layer(torch.tensor(x)).numpy() + layer.lora_B["default"](
            layer.lora_A["default"](torch.tensor(x))).numpy() * layer.scaling["default"]
    ours = np.asarray(dense(x))
    assert np.abs(theirs - lora_only).max() > 0.05  # m is doing something
    assert measured(f"DoRA output ({form})", ours, theirs) <= TOL


@pytest.mark.parametrize("form", ["separate", "merged"])
def test_one_adamw_step_changes_a_b_and_m_as_peft_does(form):
    import tensorflow as tf

    lr, wd = 1e-3, 1e-2
    dense, model, layer, _ = dora_pair(form)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((16, FAN_IN)).astype("float32")
    target = rng.standard_normal((16, FAN_OUT)).astype("float32")

    variables = [dense.lora_kernel_a, dense.lora_kernel_b, dense.dora_magnitude]
    opt = tr.make_optimizer(TrainConfig(learning_rate=lr, weight_decay=wd, grad_clip=1.0), 100,
                            "float32")
    opt.build(variables)
    before = [v.numpy().copy() for v in variables]
    with tf.GradientTape() as tape:
        loss = keras.ops.mean(keras.ops.square(dense(x) - target))
    grads = tape.gradient(loss, variables)
    opt.apply(grads, variables)
    ours = [v.numpy() - b for v, b in zip(variables, before)]

    params = {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight,
              "m": layer.lora_magnitude_vector["default"].weight}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params.values()}
    tbefore = {k: p.detach().numpy().copy() for k, p in params.items()}
    # Keras adds epsilon to sqrt(v) before the bias correction sqrt(1 - beta2^t), torch after it:
    # at step 1 Keras' 1e-7 is torch's 1e-7 / sqrt(1 - 0.999) (as tests/sd/test_lora_init.py).
    topt = torch.optim.AdamW(list(params.values()), lr=lr, betas=(0.9, 0.999),
                             eps=1e-7 / np.sqrt(1 - 0.999), weight_decay=wd)
    tloss = torch.mean((model(torch.tensor(x)) - torch.tensor(target)) ** 2)
    assert float(tloss.detach()) == pytest.approx(float(loss), rel=1e-5)
    tloss.backward()
    # the gradients themselves, before clipping: the norm is detached on both sides
    for name, g, var in zip("ABm", grads, variables):
        tg = params[name].grad.numpy()
        assert measured(f"gradient of {name}", np.asarray(g), tg.T if name in "AB" else tg,
                        np.abs(tg).max()) <= 1e-5
    norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0))
    assert norm > 1.0  # so clipping (train.grad_clip) is part of what is compared
    topt.step()
    theirs = {k: p.detach().numpy() - tbefore[k] for k, p in params.items()}
    for name, change in zip("ABm", ours):
        t = theirs[name].T if name in "AB" else theirs[name]
        assert np.abs(t).max() > 1e-4  # the step moved it
        assert measured(f"AdamW change of {name} ({form})", change, t) <= TOL


# --------------------------------------------------------------------------------------------
# Small SD 1.x-shaped models: 16 transformers and 12 CLIP layers, as the exported names need


@pytest.fixture(scope="module")
def small():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, cross_attention_dim=32, attention_head_dim=8,
        block_out_channels=(32, 32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=12,
        vocab_size=1000, max_position_embeddings=77, hidden_act="quick_gelu")).eval()
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",)).eval()
    return unet, text_encoder, vae


def modules_of(unet, text_encoder) -> dict[str, torch.nn.Linear]:
    """Our layer name -> the diffusers / transformers Linear it changes."""
    u = dict(unet.named_modules())
    t = {k if k.startswith("text_model.") else "text_model." + k: m
         for k, m in text_encoder.named_modules()}
    return {ours: (t if ours.startswith("te") else u)[module]
            for ours, module in {**LF.unet_modules(), **LF.te_modules()}.items()}


def random_dora(linears, path, seed=3):
    """A fashion-sd DoRA checkpoint on every U-Net projection and text-encoder layer: rank 4,
    alpha 8, B and m far from their start."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for ours, linear in linears.items():
        w = linear.weight.detach().numpy().T  # Keras' (in, out)
        a = (rng.standard_normal((w.shape[0], RANK)) / np.sqrt(w.shape[0])).astype("float32")
        b = (rng.standard_normal((RANK, w.shape[1])) * 0.3).astype("float32")
        norms = np.linalg.norm(w + ALPHA / RANK * a.astype(np.float64) @ b, axis=0)
        tensors[f"{ours}.lora_a"], tensors[f"{ours}.lora_b"] = a, b
        tensors[f"{ours}.dora_m"] = (norms * (1 + 0.2 * rng.standard_normal(w.shape[1]))).astype("float32")
    lora_file.write(path, tensors, {"rank": str(RANK), "alpha": repr(ALPHA), "type": "dora",
                                    "targets": json.dumps(["to_q", "to_k", "to_v", "out_proj"]),
                                    "layers": json.dumps(sorted(linears))})
    lora_file.check(path, fits_model=False)
    return path


def folded_copies(unet, text_encoder, path):
    """Deep copies of the models with the checkpoint folded into each kernel as fashion-sd folds
    it (lora.dora_delta, lora.folded): the reference every loader must reproduce."""
    tensors, meta = lora_file.read(path)
    unet2, te2 = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    with torch.no_grad():
        for ours, linear in modules_of(unet2, te2).items():
            w = linear.weight.detach().numpy().T
            delta = lora_file.layer_scale(meta, ours, RANK) * (
                tensors[f"{ours}.lora_a"].astype(np.float64) @ tensors[f"{ours}.lora_b"])
            delta = lora.dora_delta(w, delta, tensors[f"{ours}.dora_m"])
            linear.weight.copy_(torch.tensor(lora.folded(w, delta).T.copy()))
    return unet2, te2


def outputs(unet, text_encoder):
    rng = np.random.default_rng(0)
    latent = torch.tensor(rng.standard_normal((1, 4, 8, 8)).astype("float32"))
    context = torch.tensor(rng.standard_normal((1, 77, 32)).astype("float32"))
    tokens = torch.tensor(rng.integers(0, 1000, (1, 77)))
    with torch.no_grad():
        return (unet(latent, 500, encoder_hidden_states=context).sample.numpy(),
                text_encoder(tokens).last_hidden_state.numpy())


@pytest.fixture(scope="module")
def reference(small, tmp_path_factory):
    unet, text_encoder, _ = small
    root = tmp_path_factory.mktemp("dora")
    path = random_dora(modules_of(unet, text_encoder), root / "random.lora.safetensors")
    return path, outputs(unet, text_encoder), outputs(*folded_copies(unet, text_encoder, path))


def test_the_diffusers_export_loads_in_diffusers_as_our_fold(small, reference, tmp_path):
    """``pipe.load_lora_weights`` on the export: PEFT's DoRA layers, unmerged, give our folded
    models' outputs, and ``pipe.fuse_lora`` (PEFT's merge) gives our folded kernels. A whole
    U-Net in float32 computed two ways drifts apart by more than one layer does, so the outputs
    are held to MODEL_TOL, as the drift between PEFT's own merged and unmerged forms is
    (measured: kernels 1.7e-7 apart, U-Net outputs 2-5e-5 of their max whichever pair)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    # copies: PEFT's unfuse divides by m / norm again, not bit for bit the weights it was given
    unet, text_encoder, vae = (copy.deepcopy(m) for m in small)
    path, base, folded = reference
    out = export_lora(path, "diffusers", tmp_path / "d.safetensors")
    state = load_file(str(out))
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector"
    assert state[key].shape == (32,)
    assert json.loads(lora_file.safetensors_header(out)[1]["lora_adapter_metadata"])["unet.use_dora"]
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(out), adapter_name="dora")
    try:
        assert unet.peft_config["dora"].use_dora and text_encoder.peft_config["dora"].use_dora
        loaded = outputs(unet, text_encoder)
        pipe.fuse_lora(adapter_names=["dora"], safe_fusing=True)
        fused = outputs(unet, text_encoder)
        kernels = {k: m.get_base_layer().weight.detach().numpy().copy()
                   for k, m in modules_of(unet, text_encoder).items()}
        pipe.unfuse_lora()
    finally:
        pipe.delete_adapters("dora")
    ours = modules_of(*folded_copies(unet, text_encoder, path))
    worst = max(float(np.abs(ours[k].weight.detach().numpy() - w).max() / np.abs(w).max())
                for k, w in kernels.items())
    print(f"\n200 kernels, our fold vs PEFT's fuse_lora: max relative difference {worst:.2e}")
    assert worst <= 1e-6
    for i, name in enumerate(("unet", "text_encoder")):
        assert np.abs(folded[i] - base[i]).max() > 1e-2 * np.abs(base[i]).max()  # DoRA acts
        scale = float(np.abs(folded[i]).max())
        drift = measured(f"{name}: PEFT unmerged vs PEFT merged (the float32 drift)",
                         loaded[i], fused[i], scale)
        assert drift <= MODEL_TOL
        assert measured(f"{name}: PEFT merged vs our fold", fused[i], folded[i], scale) <= MODEL_TOL
        assert measured(f"{name}: load_lora_weights (PEFT unmerged) vs our fold",
                        loaded[i], folded[i], scale) <= MODEL_TOL


def test_the_kohya_export_is_lycoris_dora_as_diffusers_reads_kohya(small, reference, tmp_path):
    """diffusers' own kohya reader maps dora_scale to PEFT's lora_magnitude_vector: through it
    the kohya export loads into the U-Net as the diffusers export does (the shape (out, 1) ->
    (out,) the only step of ours, as PEFT stores the vector). The same file by LyCORIS' formula
    (dora_scale * (W + s up @ down) / ||..|| per output row) is our fold, text encoder too."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    unet, text_encoder, _ = small
    path, _, (latent_ref, _) = reference
    kohya = load_file(str(export_lora(path, "kohya", tmp_path / "k.safetensors")))
    unet_part = {k: v for k, v in kohya.items() if k.startswith("lora_unet_")}
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(
        {k: torch.tensor(v) for k, v in unet_part.items()})
    converted = {k: v.reshape(-1) if "lora_magnitude_vector" in k else v for k, v in converted.items()}
    assert sum("lora_magnitude_vector" in k for k in converted) == 128
    peft_unet = copy.deepcopy(unet)
    peft_unet.load_lora_adapter(converted, prefix="unet", network_alphas=alphas, adapter_name="kohya")
    assert peft_unet.peft_config["kohya"].use_dora
    loaded = outputs(peft_unet, text_encoder)[0]
    assert measured("unet with the kohya export through diffusers' kohya reader vs our fold",
                    loaded, latent_ref, float(np.abs(latent_ref).max())) <= MODEL_TOL

    tensors, meta = lora_file.read(path)
    worst = 0.0
    for ours, linear in modules_of(unet, text_encoder).items():
        name = ("lora_te_" if ours.startswith("te") else "lora_unet_") + {
            **LF.unet_modules(), **LF.te_modules()}[ours].replace(".", "_")
        w = linear.weight.detach().numpy().astype(np.float64)  # torch's (out, in)
        full = w + kohya[f"{name}.alpha"] / RANK * (
            kohya[f"{name}.lora_up.weight"].astype(np.float64) @ kohya[f"{name}.lora_down.weight"])
        assert kohya[f"{name}.dora_scale"].shape == (w.shape[0], 1)
        lycoris = kohya[f"{name}.dora_scale"] * full / np.linalg.norm(full, axis=1, keepdims=True)
        delta = lora.dora_delta(w.T, lora_file.layer_scale(meta, ours, RANK) * (
            tensors[f"{ours}.lora_a"].astype(np.float64) @ tensors[f"{ours}.lora_b"]),
            tensors[f"{ours}.dora_m"])
        worst = max(worst, float(np.abs(lycoris - (w + delta.T)).max() / np.abs(lycoris).max()))
    print(f"\nkohya export by LyCORIS' formula vs our fold: max relative difference {worst:.2e}")
    assert worst <= 1e-6
    meta_k = lora_file.safetensors_header(tmp_path / "k.safetensors")[1]
    assert json.loads(meta_k["ss_network_args"])["dora_wd"] == "True"


def test_a_dora_diffusers_trained_imports_as_peft_merges_it(small, tmp_path):
    """The file diffusers' DoRA training writes (unet.add_adapter(use_dora=True),
    get_peft_model_state_dict, save_lora_weights with its adapter metadata) imports to a DoRA
    checkpoint whose folded kernels are PEFT's own merge of that adapter."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig as PeftConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(small[0])
    config = PeftConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", use_dora=True,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet.add_adapter(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=config.to_dict(), weight_name="dora.safetensors")
    meta = import_lora(tmp_path / "dora.safetensors", tmp_path / "d.lora.safetensors")
    assert meta["type"] == "dora" and meta["imported_format"] == "diffusers"
    assert meta["rank"] == str(RANK) and float(meta["alpha"]) == ALPHA
    tensors, _ = lora_file.read(tmp_path / "d.lora.safetensors")
    merged = copy.deepcopy(unet)
    modules = dict(merged.named_modules())
    worst = 0.0
    for ours, module in LF.unet_modules().items():
        layer = modules[module]
        w = layer.base_layer.weight.detach().numpy().T.copy()
        layer.merge(safe_merge=True)
        peft_merged = layer.base_layer.weight.detach().numpy().T
        delta = lora.dora_delta(w, ALPHA / RANK * (tensors[f"{ours}.lora_a"].astype(np.float64)
                                                   @ tensors[f"{ours}.lora_b"]), tensors[f"{ours}.dora_m"])
        worst = max(worst, float(np.abs(lora.folded(w, delta) - peft_merged).max()
                                 / np.abs(peft_merged).max()))
    print(f"\ndiffusers-trained DoRA imported, our fold vs PEFT's merge: max relative {worst:.2e}")
    assert worst <= TOL
    # and out again as diffusers: PEFT's tensors bit for bit
    back = load_file(str(export_lora(tmp_path / "d.lora.safetensors", "diffusers", tmp_path / "b.safetensors")))
    src = load_file(str(tmp_path / "dora.safetensors"))
    assert back.keys() == src.keys()
    for k in src:
        np.testing.assert_array_equal(back[k], src[k])


def test_lycoris_files_import_and_export_back_bit_for_bit(reference, tmp_path):
    path, _, _ = reference
    kohya = export_lora(path, "kohya", tmp_path / "k.safetensors")
    meta = import_lora(kohya, tmp_path / "k.lora.safetensors")
    assert meta["type"] == "dora" and meta["imported_format"] == "kohya"
    again, src = load_file(str(tmp_path / "k.lora.safetensors")), load_file(str(path))
    assert again.keys() == src.keys()
    for k in src:
        np.testing.assert_array_equal(again[k], src[k])
    for fmt in LF.FORMATS:  # and import(export) of the import is the same file's tensors
        out = export_lora(tmp_path / "k.lora.safetensors", fmt, tmp_path / f"x.{fmt}.safetensors")
        first = load_file(str(export_lora(path, fmt, tmp_path / f"y.{fmt}.safetensors")))
        second = load_file(str(out))
        assert first.keys() == second.keys()
        assert all(np.array_equal(first[k], second[k]) for k in first)


def test_dora_files_fashion_sd_cannot_apply_are_named(reference, tmp_path):
    path, _, _ = reference
    kohya = load_file(str(export_lora(path, "kohya", tmp_path / "k.safetensors")))
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    input_axis = {**kohya, f"{q}.dora_scale": np.ones((1, 32), np.float32)}
    save_file(input_axis, str(tmp_path / "in.safetensors"))
    with pytest.raises(InteropError, match=r"magnitude per input channel \(1, 32\).*wd_on_out=False"):
        import_lora(tmp_path / "in.safetensors", tmp_path / "o.lora.safetensors")
    mixed = {k: v for k, v in kohya.items() if k != f"{q}.dora_scale"}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(InteropError, match="DoRA on 199 modules and plain LoRA on 1"):
        import_lora(tmp_path / "mixed.safetensors", tmp_path / "o.lora.safetensors")
    assert not (tmp_path / "o.lora.safetensors").exists()
