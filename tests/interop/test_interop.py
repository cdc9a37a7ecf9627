"""The bridge to diffusers, proven against diffusers and transformers themselves (no download).

Random-init SD 1.x models on the peer's side (one full-size U-Net, shared by every test here),
imported into KerasCV's classes (one full-size U-Net, shared too), must give the same outputs for
the same inputs at 8x8 latents: max |difference| <= 1e-3 of the output's max |value|, float32.
KerasCV differs on purpose in two places (tanh-GELU in GEGLU, GroupNorm eps 1e-5), so a correct
mapping lands near 5e-5, and a wrong one (two tensors of one shape swapped) far above 1e-3.

Memory: a full U-Net is 3.4 GB per framework. The ``peer`` fixture therefore does all torch work
first (reference outputs with and without LoRA, diffusers' single-file loader, the files) and frees
the torch models before KerasCV's components are built; the tests compare against its numbers.
"""

import gc
import json
import os
import pickle
import shutil

import numpy as np
import pytest

# CI installs the interop extra: there a missing peer is a failure, never a skip.
if os.environ.get("CI"):
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
else:
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")

from fashion_sd.interop import keys as K  # noqa: E402
from fashion_sd.interop import lora_formats as LF  # noqa: E402
from fashion_sd.interop.lora_formats import export_lora, import_lora  # noqa: E402
from fashion_sd.interop.tensors import InteropError  # noqa: E402
from fashion_sd.interop.weights import import_model, merge_model  # noqa: E402
from fashion_sd.sd import lora, lora_file, models  # noqa: E402
from fashion_sd.sd.diffusion import timestep_embedding  # noqa: E402

pytestmark = pytest.mark.slow
TOL = 1e-3


def rel(ours, theirs) -> float:
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def agree(name, ours, theirs):
    r = rel(np.asarray(ours), np.asarray(theirs))
    print(f"\n{name}: max |KerasCV - peer| / max |peer| = {r:.2e}")
    assert r <= TOL, f"{name}: max |diff| / max |ref| = {r:.2e} > {TOL}"
    return r


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


class Peer:
    """diffusers / transformers models with random weights, a diffusers folder, inputs, outputs."""


def _round(module, dtype):
    # Weights exactly representable in the dtype a single file stores them in, so a file in that
    # dtype holds the very same model and every comparison below is against one reference.
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).float())


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    p = Peer()
    root = tmp_path_factory.mktemp("peer")
    p.folder = root / "sd"
    p.unet = UNet2DConditionModel(  # SD 1.x: v1-inference.yaml's U-Net
        sample_size=8, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()
    p.vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        sample_size=64).eval()
    with torch.no_grad():  # default init leaves the shortcut/attention outputs near zero
        for prm in p.vae.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)
    p.text_encoder = clip_text_model()
    _round(p.unet, torch.float16)
    _round(p.text_encoder, torch.float16)
    _round(p.vae, torch.bfloat16)
    p.unet.save_pretrained(p.folder / "unet")
    p.vae.save_pretrained(p.folder / "vae")
    p.text_encoder.save_pretrained(p.folder / "text_encoder")

    rng = np.random.default_rng(0)
    p.latent = rng.standard_normal((1, 8, 8, 4)).astype("float32")
    p.t = 500
    p.context = rng.standard_normal((1, 77, 768)).astype("float32")
    p.image = rng.uniform(-1, 1, (1, 64, 64, 3)).astype("float32")
    p.tokens = rng.integers(0, 49408, (1, 77)).astype("int32")
    p.ref = p.outputs()

    p.single_file = write_single_file(p, root / "sd1x.safetensors")
    te_sd = {K.compvis_clip_key(k): v for k, v in p.text_encoder.state_dict().items()}
    p.ckpt = root / "parts.ckpt"
    torch.save({"state_dict": K.to_compvis(vae=p.vae.state_dict(), text_encoder=te_sd),
                "global_step": 1}, p.ckpt)

    p.lora = random_lora(p, root / "random.lora.safetensors")
    p.lora_files, p.lora_ref, p.adapter_ref = {}, {}, {}
    for fmt in LF.FORMATS:
        p.lora_files[fmt] = export_lora(p.lora, fmt, root / f"random.{fmt}.safetensors")
        p.lora_ref[fmt], p.adapter_ref[fmt] = lora_outputs(p, p.lora_files[fmt], fmt)
    # (after the files: PEFT leaves its wrappers, and their names, in the models)
    del p.unet, p.vae, p.text_encoder, te_sd
    gc.collect()
    p.single_file_mismatches = read_single_file_with_diffusers(p)
    yield p
    shutil.rmtree(root)  # 7 GB; pytest would keep it for three runs




def clip_text_model():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14's text tower, as in SD 1.x
        hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072, num_attention_heads=12,
        num_hidden_layers=12, max_position_embeddings=77, projection_dim=768)).eval()


def random_lora(p, path):
    """A fashion-sd checkpoint on every U-Net projection and text-encoder layer: rank 4, alpha 8."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    unet_mods = dict(p.unet.named_modules())
    te_mods = {k if k.startswith("text_model.") else "text_model." + k: m
               for k, m in p.text_encoder.named_modules()}
    tensors = {}
    for ours, module in {**LF.unet_modules(), **LF.te_modules()}.items():
        out_dim, in_dim = (te_mods if ours.startswith("te") else unet_mods)[module].weight.shape
        tensors[f"{ours}.lora_a"] = (rng.standard_normal((in_dim, 4)) / np.sqrt(in_dim)).astype("float32")
        tensors[f"{ours}.lora_b"] = (rng.standard_normal((4, out_dim)) * 0.05).astype("float32")
    layers = sorted({k.rsplit(".", 1)[0] for k in tensors})
    save_file(tensors, str(path), metadata={
        "format": lora_file.FORMAT, "format_version": lora_file.FORMAT_VERSION, "rank": "4", "alpha": "8.0",
        "targets": json.dumps(["to_q", "to_k", "to_v", "out_proj"]), "layers": json.dumps(layers)})
    return path


def lora_outputs(p, path, fmt):
    """Outputs with the LoRA file as diffusers users load it: the pipeline's load_lora_weights,
    and unet.load_lora_adapter on its own (kohya: after diffusers' own conversion)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=p.vae, text_encoder=p.text_encoder, tokenizer=None,
                                   unet=p.unet, scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path), adapter_name=fmt)
    try:
        with_pipe = p.outputs(("unet", "text_encoder"))
    finally:
        pipe.delete_adapters(fmt)
    state, alphas, adapter_meta = StableDiffusionPipeline.lora_state_dict(
        str(path), return_lora_metadata=True)
    p.unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas, adapter_name="alone",
                             metadata=adapter_meta)
    try:
        alone = p.outputs(("unet",))["unet"]
    finally:
        p.unet.delete_adapters("alone")
    assert np.array_equal(p.outputs(("unet",))["unet"], p.ref["unet"])  # the adapters are gone
    return with_pipe, alone


def write_single_file(p, path):
    """The CompVis layout, fp16 U-Net and text encoder, bf16 VAE, a schedule buffer and position
    ids: what an A1111 checkpoint holds."""
    from safetensors.torch import save_file

    te_sd = {K.compvis_clip_key(k): v for k, v in p.text_encoder.state_dict().items()}
    sd = K.to_compvis(p.unet.state_dict(), p.vae.state_dict(), te_sd)
    sd = {k: v.to(torch.bfloat16 if k.startswith(K.VAE_PREFIX) else torch.float16).contiguous()
          for k, v in sd.items()}
    sd["alphas_cumprod"] = torch.linspace(1, 0.01, 1000)
    sd[K.CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, str(path))
    return path


def read_single_file_with_diffusers(p) -> dict[str, list[str]]:
    """diffusers' own single-file loaders (offline, configs from our folder) on our CompVis file:
    the tensors that differ from the diffusers folder, per part. One model in memory at a time."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        load_single_file_checkpoint,
    )
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    kw = dict(config=str(p.folder), local_files_only=True, torch_dtype=torch.float32)
    out = {}
    for sub, load in (
            ("unet", lambda: UNet2DConditionModel.from_single_file(str(p.single_file), subfolder="unet", **kw)),
            ("vae", lambda: AutoencoderKL.from_single_file(str(p.single_file), subfolder="vae", **kw)),
            ("text_encoder", lambda: create_diffusers_clip_model_from_ldm(
                CLIPTextModel, load_single_file_checkpoint(str(p.single_file), local_files_only=True),
                subfolder="text_encoder", **kw))):
        theirs = load().state_dict()
        (file,) = [f for f in (p.folder / sub).glob("*.safetensors")]
        mine = load_file(str(file))
        out[sub] = sorted(set(mine) ^ set(theirs)) + [k for k in mine if k in theirs
                                                     and not torch.equal(mine[k], theirs[k])]
        del theirs, mine
        gc.collect()
    return out


def _peer_outputs(p, which=("unet", "text_encoder", "image_encoder", "decoder")):
    out = {}
    with torch.no_grad():
        if "unet" in which:
            out["unet"] = nhwc(p.unet(nchw(p.latent), p.t,
                                      encoder_hidden_states=torch.from_numpy(p.context)).sample)
        if "text_encoder" in which:
            out["text_encoder"] = p.text_encoder(torch.from_numpy(p.tokens).long()).last_hidden_state.numpy()
        # KerasCV's encoder returns the latent mean times SD's scaling 0.18215; its decoder
        # undoes that scaling itself.
        if "image_encoder" in which:
            out["image_encoder"] = nhwc(p.vae.encode(nchw(p.image)).latent_dist.mean) * 0.18215
        if "decoder" in which:
            out["decoder"] = nhwc(p.vae.decode(nchw(p.latent) / 0.18215).sample)
    return out


Peer.outputs = _peer_outputs


@pytest.fixture(scope="module")
def kcv():
    """KerasCV's four components at 64 px, built once with random weights, filled by imports."""
    import keras

    keras.utils.set_random_seed(1)
    return {name: models.build_component(name, 64) for name in models.COMPONENTS}


def kcv_outputs(kcv, p, which=models.COMPONENTS):
    out = {}
    if "diffusion_model" in which:
        emb = np.asarray(timestep_embedding(np.array([p.t])))
        out["unet"] = kcv["diffusion_model"].predict_on_batch([p.latent, emb, p.context])
    if "text_encoder" in which:
        out["text_encoder"] = kcv["text_encoder"].predict_on_batch(
            {"tokens": p.tokens, "positions": np.arange(77, dtype="int32")[None]})
    if "image_encoder" in which:
        out["image_encoder"] = kcv["image_encoder"].predict_on_batch(p.image)
    if "decoder" in which:
        out["decoder"] = kcv["decoder"].predict_on_batch(p.latent)
    return {k: np.asarray(v) for k, v in out.items()}


def scramble(model, seed=0):
    rng = np.random.default_rng(seed)
    for v in model.weights:
        v.assign(np.full(v.shape, rng.uniform(-0.01, 0.01), "float32"))


@pytest.fixture(scope="module")
def imported(peer, kcv, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported")
    summary = import_model(peer.folder, out, built=kcv)
    yield out, summary
    shutil.rmtree(out)


def test_a_diffusers_folder_imports_to_the_same_outputs(peer, kcv, imported):
    out, summary = imported
    assert summary["absent"] == [] and summary["origin"]["layout"] == "diffusers"
    assert set(summary["components"]) == set(models.COMPONENTS)
    written = json.loads((out / "source.json").read_text())
    digest = written["origin"]["sha256"]["unet/diffusion_pytorch_model.safetensors"]
    assert digest == __import__("hashlib").sha256(
        (peer.folder / "unet/diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    # The files, not the models the import filled, are the product: load them into KerasCV's
    # classes over scrambled weights, through model.weights: local:DIR as a run would.
    source = models.resolve_weights(f"local:{out}")
    assert source.kind == "local" and all(p.name.endswith(".weights.h5") for p in source.files.values())
    for name, model in kcv.items():
        scramble(model)
        model.load_weights(str(source.files[name]))
    ours = kcv_outputs(kcv, peer)
    for name in ("unet", "text_encoder", "image_encoder", "decoder"):
        agree(f"{name} (diffusers folder)", ours[name], peer.ref[name])


def test_a_compvis_single_file_is_what_diffusers_single_file_loader_reads(peer, kcv, tmp_path):
    # diffusers' loader reads our CompVis file as the very models of the diffusers folder ...
    assert peer.single_file_mismatches == {"unet": [], "vae": [], "text_encoder": []}
    # ... and our importer reads it into KerasCV with their outputs.
    for model in kcv.values():
        scramble(model, seed=1)
    summary = import_model(peer.single_file, tmp_path / "out", built=kcv)
    assert summary["origin"]["layout"] == "compvis" and summary["absent"] == []
    assert summary["source_dtypes"] == {"diffusion_model": ["F16"], "text_encoder": ["F16"],
                                        "image_encoder": ["BF16"], "decoder": ["BF16"]}
    assert summary["skipped"] == {"noise-schedule buffers and EMA counters (not weights)": 1,
                                  "position ids (a buffer: 0..76)": 1}
    ours = kcv_outputs(kcv, peer)
    for name in ("unet", "text_encoder", "image_encoder", "decoder"):
        agree(f"{name} (single file)", ours[name], peer.ref[name])
    shutil.rmtree(tmp_path / "out")


def test_a_ckpt_pickle_with_vae_and_text_encoder_only(peer, kcv, tmp_path):
    scramble(kcv["decoder"], seed=2)
    summary = import_model(peer.ckpt, tmp_path / "out", built={"decoder": kcv["decoder"]})
    assert summary["absent"] == ["diffusion_model"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "kcv_decoder.weights.h5", "kcv_encoder.weights.h5", "source.json", "vae_encoder.weights.h5"]
    agree("decoder (.ckpt)", kcv_outputs(kcv, peer, ["decoder"])["decoder"], peer.ref["decoder"])


def test_a_diffusers_folder_of_bin_files(small_parts, tmp_path):
    """Older diffusers folders hold torch pickles (.bin), read with weights_only=True."""
    from fashion_sd.interop import kerascv

    state = {**kerascv.state_dict(kerascv.decoder_targets(small_parts["decoder"])),
             **kerascv.state_dict(kerascv.image_encoder_targets(small_parts["image_encoder"]))}
    (tmp_path / "sd" / "vae").mkdir(parents=True)
    torch.save({k: torch.from_numpy(v).half() for k, v in state.items()},
               tmp_path / "sd/vae/diffusion_pytorch_model.bin")
    built = {n: models.build_component(n, 64) for n in ("image_encoder", "decoder")}
    summary = import_model(tmp_path / "sd", tmp_path / "out", built=built)
    assert summary["origin"]["sha256"].keys() == {"vae/diffusion_pytorch_model.bin"}
    assert summary["source_dtypes"]["decoder"] == ["float16"]
    for name, model in built.items():
        for ours, theirs in zip(model.weights, small_parts[name].weights):
            np.testing.assert_array_equal(ours.numpy(), theirs.numpy().astype(np.float16).astype(np.float32))


class _Evil:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_a_pickle_that_wants_to_run_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    with path.open("wb") as fh:
        pickle.dump({"state_dict": {"x": _Evil()}}, fh)
    with pytest.raises(InteropError, match=r"evil\.ckpt: not a tensor file this tool can open safely") as err:
        import_model(path, tmp_path / "out")
    assert "ran code" not in capsys.readouterr().out
    assert "weights_only" not in str(err.value)  # never the unsafe advice torch's message gives


# --------------------------------------------------------------------------------------------
# LoRA: every format diffusers reads gives KerasCV's output with the same LoRA


@pytest.fixture(scope="module")
def kcv_with_lora(kcv, imported, peer):
    """KerasCV outputs with the random LoRA folded in (over the imported base weights)."""
    out, _ = imported
    for name in ("diffusion_model", "text_encoder"):
        kcv[name].load_weights(str(out / models.WEIGHT_FILES[name].keras3_name))
    deltas, _ = lora.lora_deltas(peer.lora, kcv["diffusion_model"], text_encoder=kcv["text_encoder"])
    swap = lora.LoraSwap()
    swap.apply(deltas)
    outputs = kcv_outputs(kcv, peer, ["diffusion_model", "text_encoder"])
    swap.reset()
    return outputs, deltas


@pytest.mark.parametrize("fmt", LF.FORMATS)
def test_an_exported_lora_loaded_by_diffusers_gives_kerascv_output(fmt, peer, kcv_with_lora):
    ours, _ = kcv_with_lora
    theirs = peer.lora_ref[fmt]
    for name in ("unet", "text_encoder"):
        agree(f"{name} with LoRA ({fmt}, load_lora_weights)", ours[name], theirs[name])
        # the LoRA matters: its effect is far above the tolerance
        assert rel(theirs[name], peer.ref[name]) > 30 * TOL
    agree(f"unet with LoRA ({fmt}, load_lora_adapter)", ours["unet"], peer.adapter_ref[fmt])


@pytest.mark.parametrize("fmt", LF.FORMATS)
def test_import_then_export_is_bit_exact(fmt, peer, tmp_path):
    from safetensors.numpy import load_file

    first = peer.lora_files[fmt]
    meta = import_lora(first, tmp_path / "back.lora.safetensors")
    assert (meta["rank"], meta["alpha"], meta["imported_format"]) == ("4", "8.0", fmt)
    assert json.loads(meta["targets"]) == ["to_q", "to_k", "to_v", "out_proj"]
    original, back = load_file(str(peer.lora)), load_file(str(tmp_path / "back.lora.safetensors"))
    assert original.keys() == back.keys()
    assert all(np.array_equal(original[k], back[k]) for k in original)
    again = export_lora(tmp_path / "back.lora.safetensors", fmt, tmp_path / f"b.{fmt}.safetensors")
    a, b = load_file(str(first)), load_file(str(again))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_merge_equals_unmerged(peer, kcv, imported, kcv_with_lora, tmp_path):
    out, _ = imported
    for name in ("diffusion_model", "text_encoder"):
        kcv[name].load_weights(str(out / models.WEIGHT_FILES[name].keras3_name))
    _, deltas = kcv_with_lora
    swap = lora.LoraSwap()
    swap.apply(deltas, 0.5)
    unmerged = kcv_outputs(kcv, peer, ["diffusion_model", "text_encoder"])
    swap.reset()
    # the shared U-Net and text encoder take the merge (a U-Net build costs 40 s); then the
    # merged files are loaded over scrambled weights: they are what is checked
    record = merge_model(f"local:{out}", peer.lora, tmp_path / "merged", strength=0.5,
                         built={n: kcv[n] for n in ("diffusion_model", "text_encoder")})
    assert record["merged_lora"]["strength"] == 0.5
    merged = models.resolve_weights(f"local:{tmp_path / 'merged'}")
    for name in ("diffusion_model", "text_encoder"):
        scramble(kcv[name], seed=3)
        kcv[name].load_weights(str(merged.files[name]))
    ours = kcv_outputs(kcv, peer, ["diffusion_model", "text_encoder"])
    for name in ("unet", "text_encoder"):
        r = rel(ours[name], unmerged[name])
        print(f"\n{name}: merged vs unmerged max |diff| / max = {r:.1e}")
        assert r <= 1e-5
    shutil.rmtree(tmp_path / "merged")
