"""LoRA files in the formats other tools read: kohya (A1111, ComfyUI) and diffusers (PEFT).

All three formats hold the same two matrices per projection and differ in names, orientation and
where alpha lives (the effect is ``W += alpha / rank * up @ down`` in torch's (out, in) layout):

============  ======================================  ==================  =========================
format        names                                   matrices            alpha
============  ======================================  ==================  =========================
fashion-sd    ``st00.attn1.to_q.lora_a`` / ``lora_b``  A (in, r), B (r,    metadata ``alpha``
                                                      out): Keras layout
kohya         ``lora_unet_down_blocks_0_attentions_0  ``lora_down`` (r,   an ``.alpha`` tensor per
              _transformer_blocks_0_attn1_to_q``       in), ``lora_up``    module (absent: = rank)
                                                      (out, r)
diffusers     ``unet.down_blocks.0.attentions.0.      ``lora_A`` (r, in), metadata
              transformer_blocks.0.attn1.to_q``        ``lora_B`` (out, r) ``lora_adapter_metadata``
                                                                          (absent: = rank)
============  ======================================  ==================  =========================

Text-encoder parts (``lora_te_...``, ``text_encoder....``) map onto KerasCV's TextEncoder as
``te00.q_proj`` ... ``te11.fc2``. Only LoRA on Linear layers that fashion-sd can apply is accepted:
the U-Net's attention projections and the text encoder's attention and MLP. Convolution LoRA
(LoCon), LyCORIS kinds (LoHa, LoKr, ...) and LoRA on other U-Net layers are refused by name.
Conversion is a transpose and a rename, so import then export returns the same tensors bit for bit.

DoRA (PEFT's ``use_dora``; fashion-sd ``type: dora``) adds one magnitude per output channel,
``W' = m * (W + s up @ down) / ||W + s up @ down||`` with the norm over each output channel:

- fashion-sd: ``LAYER.dora_m`` (out,), metadata ``type: dora``;
- diffusers / PEFT: ``MODULE.lora_magnitude_vector`` (out,) and ``use_dora`` in the adapter
  metadata, as PEFT saves it (``.lora_magnitude_vector.weight``, diffusers' own conversion of
  kohya files, is read too);
- kohya / LyCORIS: ``MODULE.dora_scale`` (out, 1), LyCORIS' ``wd_on_out=True`` layout (what
  diffusers' conversion reads as ``lora_magnitude_vector``). LyCORIS' older input-axis layout
  (1, in) is another function and is refused by name. (ComfyUI's loader divides output-axis
  files by the norm of W alone, not of ``W + s up @ down``: it differs from PEFT and LyCORIS
  there, by as much as the LoRA changes the norms.)
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from fashion_sd.config import LoraConfig
from fashion_sd.files import atomic_path
from fashion_sd.interop.keys import UNET_BLOCKS, _rename, unet_block_names
from fashion_sd.interop.tensors import (
    InteropError,
    SafetensorsFile,
    load_pickle,
    sha256,
)
from fashion_sd.sd import lora_file
from fashion_sd.sd.lora_file import is_text_encoder_layer, layer_alpha

FORMATS = ("kohya", "diffusers")
UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "out_proj": "to_out.0"}
TE_PROJ = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
           "out_proj": "self_attn.out_proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
TE_LAYERS = 12
LYCORIS_MARKERS = ("hada_", "lokr_", "oft_", "lora_mid", ".diff", "on_input",
                   "boft_", "glora_", ".w_norm", ".b_norm")
MAGNITUDE_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")


def unet_modules() -> dict[str, str]:
    """fashion-sd layer name -> diffusers module path, for every U-Net attention projection."""
    out = {}
    for i, block in enumerate(unet_block_names()["st"]):
        for a in (1, 2):
            for ours, theirs in UNET_PROJ.items():
                out[f"st{i:02d}.attn{a}.{ours}"] = f"{block}.transformer_blocks.0.attn{a}.{theirs}"
    return out


def te_modules() -> dict[str, str]:
    """fashion-sd layer name -> transformers CLIPTextModel module path."""
    return {f"te{i:02d}.{ours}": f"text_model.encoder.layers.{i}.{theirs}"
            for i in range(TE_LAYERS) for ours, theirs in TE_PROJ.items()}


def _kohya_names() -> dict[str, str]:
    """kohya module name -> fashion-sd layer; U-Net blocks under diffusers' and CompVis' names."""
    out = {}
    for ours, module in unet_modules().items():
        out["lora_unet_" + module.replace(".", "_")] = ours
        compvis = _rename(module, UNET_BLOCKS, False)  # older A1111-era files use these
        out["lora_unet_" + compvis.replace(".", "_")] = ours
    for ours, module in te_modules().items():
        out["lora_te_" + module.replace(".", "_")] = ours
    return out


# --------------------------------------------------------------------------------------------
# Reading any supported file into {layer: (down (r, in), up (out, r), alpha, magnitude)}
# (magnitude: DoRA's (out,), None for a plain LoRA)


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if not path.is_file():
        raise InteropError(f"{path}: LoRA file not found")
    if path.suffix == ".safetensors":
        f = SafetensorsFile(path)
        return {k: f[k] for k in f.keys()}, f.metadata
    return load_pickle(path), {}


def _refuse_kinds(path: Path, keys) -> None:
    lyco = sorted(k for k in keys if any(m in k for m in LYCORIS_MARKERS))
    if lyco:
        raise InteropError(f"{path}: LyCORIS tensors ({', '.join(lyco[:4])}"
                           + (" ..." if len(lyco) > 4 else "") + "); fashion-sd applies LoRA and "
                           "DoRA only. Convert it to a plain LoRA (e.g. kohya's extract/resize scripts)")
    if any(k.startswith(("lora_te1_", "lora_te2_")) or ".text_encoder_2." in k
           or k.startswith("text_encoder_2.") for k in keys):
        raise InteropError(f"{path}: an SDXL LoRA (two text encoders); fashion-sd is SD 1.x only")


def _pairs_kohya(path, tensors):
    names = _kohya_names()
    out, unknown = {}, set()
    modules = {k.split(".", 1)[0] for k in tensors}
    for m in sorted(modules):
        down, up = tensors.get(f"{m}.lora_down.weight"), tensors.get(f"{m}.lora_up.weight")
        extra = {k for k in tensors if k.split(".", 1)[0] == m} - {
            f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha", f"{m}.dora_scale"}
        if m not in names or down is None or up is None or extra or down.ndim != 2:
            unknown.add(m)
            continue
        alpha = float(tensors[f"{m}.alpha"]) if f"{m}.alpha" in tensors else float(down.shape[0])
        scale = tensors.get(f"{m}.dora_scale")
        out[names[m]] = (down, up, alpha, None if scale is None else _magnitude(path, m, scale, up, down))
    return out, unknown


def _magnitude(path, module: str, value: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """DoRA's magnitude per output channel (out,) from LyCORIS' ``dora_scale`` (out, 1) or PEFT's
    ``lora_magnitude_vector`` (out,); LyCORIS' input-axis layout (1, in) is refused."""
    out_dim, in_dim = up.shape[0], down.shape[1]
    if value.shape in ((out_dim,), (out_dim, 1)):
        return value.reshape(out_dim)
    if value.shape == (1, in_dim):
        raise InteropError(f"{path}: {module}: a DoRA with its magnitude per input channel "
                           f"{value.shape} (LyCORIS' wd_on_out=False); fashion-sd applies PEFT's "
                           "DoRA, per output channel (LyCORIS' wd_on_out=True) only")
    raise InteropError(f"{path}: {module}: DoRA magnitude of shape {value.shape}, the layer has "
                       f"{out_dim} outputs")


def _pairs_diffusers(path, tensors, meta):
    mods = {**{"unet." + v: k for k, v in unet_modules().items()},
            **{"text_encoder." + v: k for k, v in te_modules().items()}}
    # transformers >= 5.6 names CLIPTextModel's modules without the text_model. level
    mods.update({"text_encoder." + v[len("text_model."):]: k for k, v in te_modules().items()})
    adapter = json.loads(meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in meta else {}
    pattern = re.compile(r"^(.*)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight$")
    groups, unknown = {}, set()
    for k in tensors:
        m = pattern.match(k)
        if k.endswith(".alpha"):
            continue
        magnitude = next((k[:-len(s)] for s in MAGNITUDE_SUFFIXES if k.endswith(s)), None)
        if not m and magnitude is None:
            unknown.add(k)
            continue
        module = magnitude or m.group(1)
        if module.startswith("base_model.model."):  # a bare PEFT adapter of the U-Net
            module = "unet." + module[len("base_model.model."):]
        part = "magnitude" if magnitude else "down" if m.group(2) in ("lora_A", "lora.down") else "up"
        groups.setdefault(module, {})[part] = tensors[k]
    out = {}
    for module, mats in groups.items():
        if (module not in mods or set(mats) - {"magnitude"} != {"down", "up"}
                or mats["down"].ndim != 2):
            unknown.add(module)
            continue
        part = module.split(".", 1)[0]
        rank = mats["down"].shape[0]
        inner = module[len(part) + 1:]
        if f"{module}.alpha" in tensors:
            alpha = float(tensors[f"{module}.alpha"])
        else:
            alpha_pattern = adapter.get(f"{part}.alpha_pattern") or {}
            alpha = next((float(v) for p, v in alpha_pattern.items() if inner.endswith(p)), None)
            if alpha is None:
                alpha = float(adapter.get(f"{part}.lora_alpha", rank))
        magnitude = mats.get("magnitude")
        if magnitude is not None:
            magnitude = _magnitude(path, module, magnitude, mats["up"], mats["down"])
        out[mods[module]] = (mats["down"], mats["up"], alpha, magnitude)
    return out, unknown


def read_foreign_lora(path: str | Path) -> tuple[dict, str, dict]:
    """A kohya or diffusers LoRA file as ``{layer: (down, up, alpha, magnitude)}`` (magnitude:
    DoRA's (out,), else None), its format and metadata."""
    path = Path(path)
    tensors, meta = _read(path)
    if meta.get("format") == "fashion-sd-lora":
        raise InteropError(f"{path}: already a fashion-sd LoRA checkpoint; use it as it is")
    _refuse_kinds(path, tensors)
    if not tensors:
        raise InteropError(f"{path}: no tensors")
    if all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors):
        fmt = "kohya"
        pairs, unknown = _pairs_kohya(path, tensors)
    elif any(".lora_A." in k or ".lora.down." in k for k in tensors):
        fmt = "diffusers"
        pairs, unknown = _pairs_diffusers(path, tensors, meta)
    else:
        raise InteropError(f"{path}: neither kohya (lora_unet_*.lora_down.weight) nor diffusers "
                           f"(unet.*.lora_A.weight) LoRA keys, e.g. {next(iter(tensors))}")
    if unknown:
        conv = sorted(u for u in unknown if any(
            np.ndim(v) == 4 for k, v in tensors.items() if k.startswith(u + ".")))
        kind = ("convolution LoRA (LoCon) on " + ", ".join(conv[:3]) + "; " if conv else "")
        raise InteropError(
            f"{path}: {len(unknown)} LoRA modules fashion-sd cannot apply: {kind}"
            f"{', '.join(sorted(unknown)[:5])}" + (" ..." if len(unknown) > 5 else "")
            + ". fashion-sd applies LoRA to the U-Net's attention to_q/to_k/to_v/to_out and the "
            "text encoder's attention and MLP only")
    for layer, (down, up, _, _) in pairs.items():
        if up.shape[1] != down.shape[0]:
            raise InteropError(f"{path}: {layer}: lora_up {up.shape} and lora_down {down.shape} "
                               "disagree on the rank")
    dora = sorted(k for k, (*_, m) in pairs.items() if m is not None)
    if dora and len(dora) != len(pairs):
        plain = sorted(set(pairs) - set(dora))
        raise InteropError(f"{path}: DoRA on {len(dora)} modules and plain LoRA on {len(plain)} "
                           f"({plain[0]}, ...); fashion-sd applies one kind per file")
    return pairs, fmt, meta


def targets_of(layers) -> list[str]:
    """The shortest ``lora.targets`` list that selects exactly these U-Net layers."""
    layers = set(layers)
    n = len(unet_block_names()["st"])
    out = []
    for proj in UNET_PROJ:
        both = all(f"st{i:02d}.attn{a}.{proj}" in layers for i in range(n) for a in (1, 2))
        if both:
            out.append(proj)
            continue
        for a in (1, 2):
            full = [f"st{i:02d}.attn{a}.{proj}" for i in range(n)]
            if all(x in layers for x in full):
                out.append(f"attn{a}.{proj}")
            else:
                out += [x for x in full if x in layers]
    return out


def import_lora(path: str | Path, out: str | Path) -> dict:
    """A kohya or diffusers LoRA file -> a fashion-sd LoRA checkpoint at ``out``; returns its metadata.

    Rank and alpha come from the file. Where modules differ in alpha, each module's alpha is kept
    in the metadata (``layer_alpha``), so the effect is unchanged. A DoRA file becomes a DoRA
    checkpoint (``type: dora``, each layer's magnitude as ``dora_m``).
    """
    path = Path(path)
    pairs, fmt, src_meta = read_foreign_lora(path)
    ranks = Counter(int(d.shape[0]) for d, *_ in pairs.values())
    alphas = Counter(a for _, _, a, _ in pairs.values())
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    tensors = {}
    for layer, (down, up, _, magnitude) in sorted(pairs.items()):
        # Keras' Dense computes x @ (W + s A B) with W (in, out): A = down^T, B = up^T.
        tensors[f"{layer}.lora_a"] = np.ascontiguousarray(down.T.astype(np.float32))
        tensors[f"{layer}.lora_b"] = np.ascontiguousarray(up.T.astype(np.float32))
        if magnitude is not None:
            tensors[f"{layer}.dora_m"] = np.ascontiguousarray(magnitude.astype(np.float32))
    unet_layers = sorted(k for k in pairs if not is_text_encoder_layer(k))
    dora = any(m is not None for *_, m in pairs.values())
    spec = LoraConfig(rank=int(rank), alpha=float(alpha), targets=targets_of(unet_layers),
                      type="dora" if dora else "lora")
    meta = {**spec.to_meta(),
            "layers": json.dumps(sorted(pairs)), "imported_from": path.name,
            "imported_format": fmt, "imported_sha256": sha256(path),
            "source_dtype": str(next(iter(pairs.values()))[0].dtype)}
    if len(alphas) > 1:
        meta["layer_alpha"] = json.dumps({k: a for k, (_, _, a, _) in sorted(pairs.items())})
    for key in ("ss_sd_model_name", "ss_output_name", "ss_network_dim", "ss_network_alpha"):
        if key in src_meta:
            meta["source_" + key] = src_meta[key]
    lora_file.write(out, tensors, meta)
    return lora_file.safetensors_header(out)[1]


# --------------------------------------------------------------------------------------------
# Writing


def export_lora(ckpt: str | Path, fmt: str, out: str | Path) -> Path:
    """A fashion-sd LoRA checkpoint as a kohya or diffusers file that other tools load.

    kohya: ``lora_down``/``lora_up``/``alpha`` per module and ``ss_*`` metadata (A1111, ComfyUI,
    kohya's scripts). diffusers: ``lora_A``/``lora_B`` with rank and alpha in
    ``lora_adapter_metadata``, read by ``pipe.load_lora_weights`` and ``unet.load_lora_adapter``.
    A DoRA checkpoint also writes each magnitude: kohya ``dora_scale`` (out, 1), LyCORIS'
    layout; diffusers ``lora_magnitude_vector`` (out,) and ``use_dora`` in the adapter metadata.
    """

    if fmt not in FORMATS:
        raise InteropError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    tensors, meta = lora_file.read(ckpt, fits_model=False)
    layers = sorted({k.rsplit(".", 1)[0] for k in tensors})
    modules = {**unet_modules(), **te_modules()}
    unknown = [x for x in layers if x not in modules]
    if unknown:
        raise InteropError(f"{ckpt}: layers {', '.join(unknown[:4])} have no SD 1.x module name "
                           "(a checkpoint of the tiny test model?)")
    out_t, out_meta = {}, {}
    rank = int(meta["rank"])
    dora = LoraConfig.from_meta(meta).type == "dora"
    if fmt == "kohya":
        for x in layers:
            name = ("lora_te_" if is_text_encoder_layer(x) else "lora_unet_") + modules[x].replace(".", "_")
            out_t[f"{name}.lora_down.weight"] = np.ascontiguousarray(tensors[f"{x}.lora_a"].T)
            out_t[f"{name}.lora_up.weight"] = np.ascontiguousarray(tensors[f"{x}.lora_b"].T)
            out_t[f"{name}.alpha"] = np.asarray(layer_alpha(meta, x), np.float32)
            if dora:
                out_t[f"{name}.dora_scale"] = np.ascontiguousarray(tensors[f"{x}.dora_m"][:, None])
        out_meta = {"ss_network_module": "lycoris.kohya" if dora else "networks.lora",
                    "ss_network_dim": str(rank),
                    "ss_network_alpha": meta["alpha"], "ss_base_model_version": "sd_v1",
                    "ss_v2": "False", "ss_output_name": Path(out).name.split(".")[0],
                    "ss_sd_model_name": meta.get("base_weights", ""),
                    "ss_training_comment": "fashion-sd LoRA (KerasCV), exported by scripts/convert.py",
                    "modelspec.architecture": "stable-diffusion-v1/lora"}
        if dora:  # LyCORIS' record of how the file was made
            out_meta["ss_network_args"] = json.dumps({"algo": "lora", "dora_wd": "True",
                                                      "wd_on_out": "True"})
    else:
        adapter = {}
        for part, prefix, picked in (("unet", "unet.", [x for x in layers if not is_text_encoder_layer(x)]),
                                     ("text_encoder", "text_encoder.", [x for x in layers if is_text_encoder_layer(x)])):
            if not picked:
                continue
            for x in picked:
                out_t[f"{prefix}{modules[x]}.lora_A.weight"] = np.ascontiguousarray(tensors[f"{x}.lora_a"].T)
                out_t[f"{prefix}{modules[x]}.lora_B.weight"] = np.ascontiguousarray(tensors[f"{x}.lora_b"].T)
                if dora:  # PEFT's name; transformers' loader wants ".weight" (see _magnitude_key)
                    out_t[_magnitude_key(part, f"{prefix}{modules[x]}")] = tensors[f"{x}.dora_m"]
            ranks = {x: int(tensors[f"{x}.lora_a"].shape[1]) for x in picked}
            alphas = {x: layer_alpha(meta, x) for x in picked}
            base_alpha = float(meta["alpha"])
            # PEFT matches target names as suffixes; without "text_model." they match CLIPTextModel
            # both before transformers 5.6 and after, when it lost that level.
            if dora:
                adapter[f"{part}.use_dora"] = True
            adapter.update({f"{part}.r": rank, f"{part}.lora_alpha": base_alpha,
                            f"{part}.target_modules": sorted(_peft_name(modules[x]) for x in picked),
                            # PEFT matches pattern keys as module-name suffixes
                            f"{part}.rank_pattern": {_peft_name(modules[x]): r
                                                     for x, r in ranks.items() if r != rank},
                            f"{part}.alpha_pattern": {_peft_name(modules[x]): a
                                                      for x, a in alphas.items() if a != base_alpha}})
        out_meta = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter, indent=2, sort_keys=True)}
    with atomic_path(out) as tmp:
        save_file(out_t, str(tmp), metadata=out_meta)
    return Path(out)


def _magnitude_key(part: str, module: str) -> str:
    """Where a diffusers file holds a module's DoRA magnitude. The U-Net's as PEFT saves it
    (``MODULE.lora_magnitude_vector``; PEFT appends ``.weight`` when loading); the text encoder's
    with ``.weight`` already, as diffusers' own kohya conversion names it: transformers' adapter
    loader (5.x), which ``load_lora_weights`` uses for the text encoder, does not append it and
    would leave m at its start (measured). PEFT loads either spelling."""
    suffix = ".lora_magnitude_vector" + (".weight" if part == "text_encoder" else "")
    return module + suffix


def _peft_name(module: str) -> str:
    return module[len("text_model."):] if module.startswith("text_model.") else module
