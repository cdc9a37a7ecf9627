"""Bad input, one row each, across the seven commands: exit code 2, a message naming the flag, key,
file or row, no traceback, nothing written or changed, and no model built.

Each row runs the command's ``main`` in this process (fast: TensorFlow is loaded once). The model
builders, the image checker, the Inception loader, the encoders, the sweep's runner and the model
converters are replaced by a tripwire, so a check that came too late fails the row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, write_image, write_styles
from safetensors.numpy import save_file

from fashion_sd import cli


class HeavyWork(AssertionError):
    """A model build, image check or encoder run reached by a row that should have stopped."""


def _lora(path: Path, layers: dict[str, tuple[tuple, tuple]], meta: dict | None = None) -> Path:
    tensors = {}
    for key, (a, b) in layers.items():
        tensors[f"{key}.lora_a"] = np.zeros(a, np.float32)
        tensors[f"{key}.lora_b"] = np.zeros(b, np.float32)
    base = {"format": "fashion-sd-lora", "format_version": "1", "rank": "4", "alpha": "4.0",
            "targets": json.dumps(["to_q"]), "layers": json.dumps(sorted(layers))}
    save_file(tensors, str(path), metadata=base if meta is None else meta)
    return path


def _raw_safetensors(path: Path, header, data: bytes = b"") -> Path:
    """A safetensors file written byte by byte, so its header can be wrong in ways no writer
    allows: ``header`` a dict (as JSON) or the JSON text itself."""
    text = header if isinstance(header, (str, bytes)) else json.dumps(header)
    raw = text.encode() if isinstance(text, str) else text
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height pixels in a few dozen bytes: a decompression bomb's
    header (nothing is decoded before the size is judged)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                                       8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


LORA_META = {"format": "fashion-sd-lora", "format_version": "1", "rank": "4", "alpha": "4.0",
             "targets": json.dumps(["to_q"]), "layers": json.dumps(["st00.attn1.to_q"])}


def _bad_loras(d: Path) -> None:
    """LoRA files whose values or header are wrong in the ways issue 25 lists."""
    a, b = np.zeros((320, 4), np.float32), np.zeros((4, 320), np.float32)
    nan_b = b.copy()
    nan_b[1, 2] = np.nan
    save_file({"st00.attn1.to_q.lora_a": a, "st00.attn1.to_q.lora_b": nan_b},
              str(d / "nan.lora.safetensors"), metadata=LORA_META)
    inf_a = a.copy()
    inf_a[0, :2] = [np.inf, -np.inf]
    save_file({"st00.attn1.to_q.lora_a": inf_a, "st00.attn1.to_q.lora_b": b},
              str(d / "inf.lora.safetensors"), metadata=LORA_META)
    for name, meta in (("rankword", {**LORA_META, "rank": "four"}),
                       ("ranknan", {**LORA_META, "rank": "nan"}),
                       ("alphainf", {**LORA_META, "alpha": "inf"}),
                       ("targetsnotjson", {**LORA_META, "targets": "[to_q, to_k"})):
        save_file({"st00.attn1.to_q.lora_a": a, "st00.attn1.to_q.lora_b": b},
                  str(d / f"{name}.lora.safetensors"), metadata=meta)
    n = 320 * 4 * 4  # bytes of each F32 tensor
    entry = {"dtype": "F32", "shape": [320, 4]}
    entries = {"st00.attn1.to_q.lora_a": {**entry, "data_offsets": [0, n]},
               "st00.attn1.to_q.lora_b": {"dtype": "F32", "shape": [4, 320],
                                          "data_offsets": [n, 2 * n]}}
    _raw_safetensors(d / "metalist.lora.safetensors",
                     {"__metadata__": [["format", "fashion-sd-lora"]], **entries}, bytes(2 * n))
    _raw_safetensors(d / "overlap.lora.safetensors", {
        "__metadata__": LORA_META, **entries,
        "st00.attn1.to_q.lora_b": {"dtype": "F32", "shape": [4, 320],
                                   "data_offsets": [n - 16, 2 * n - 16]}}, bytes(2 * n - 16))
    _raw_safetensors(d / "backwards.lora.safetensors", {
        "__metadata__": LORA_META, **entries,
        "st00.attn1.to_q.lora_a": {**entry, "data_offsets": [n, 0]}}, bytes(2 * n))
    deep = '{"__metadata__": {"format": "fashion-sd-lora"}, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    _raw_safetensors(d / "deep.lora.safetensors", deep, b"")


def _unwritable(root: Path) -> Path | None:
    """A folder this process cannot create files in: a read-only one, or (as root, which
    permission bits do not stop) a kernel file system that takes no new files."""
    ro = root / "readonly"
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    for candidate in (ro, Path("/proc/self"), Path("/sys")):
        try:
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            return candidate
    return None


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Tiny input files, good and bad, made here."""
    d = tmp_path_factory.mktemp("bad-input")
    imgs = d / "images"
    imgs.mkdir()
    for i in range(1, 7):
        write_image(imgs / f"{i}.jpg")
    write_styles(d / "styles.csv", [
        "1,Men,Apparel,Topwear,Tshirts,Blue,Summer,2011,Casual,Shirt one",
        "2,Women,Apparel,Topwear,Tops,Red,Fall,2012,Casual,Top two"])
    write_styles(d / "nocol.csv", ["1,Men,Apparel"], header="id,gender,masterCategory")
    rows = ["id,image_path,caption,split"] + [
        f"{i},images/{i}.jpg,an image of a shirt {i},{s}"
        for i, s in zip(range(1, 7), ["train"] * 3 + ["val", "test", "test"])]
    (d / "captions.csv").write_text("\n".join(rows) + "\n")
    (d / "badsplit.csv").write_text("\n".join([*rows[:2], "2,images/2.jpg,a top,training",
                                               *rows[3:]]) + "\n")
    (d / "nocaptioncol.csv").write_text("id,image_path,split\n1,images/1.jpg,train\n")
    (d / "emptycaption.csv").write_text("\n".join([*rows[:3], "3,images/3.jpg,  ,train",
                                                   *rows[4:]]) + "\n")
    (d / "noimage.csv").write_text("\n".join([*rows, "7,images/7.jpg,a coat,train"]) + "\n")
    (d / "notest.csv").write_text("\n".join(r for r in rows if not r.endswith(",test")) + "\n")
    tests = [r for r in rows if r.endswith(",test")]
    (d / "onetest.csv").write_text("\n".join([*(r for r in rows if r not in tests[1:])]) + "\n")
    (d / "photo.png").write_bytes(write_image(d / "p.png", fmt="PNG").read_bytes())
    (d / "notes.pt").write_text("this is not a tensor file\n")
    from PIL import Image, PngImagePlugin
    info = PngImagePlugin.PngInfo()  # settings as an edited PNG (or another tool) might hold
    info.add_text("fashion-sd", json.dumps({"prompt": "a shirt", "seed": 3, "steps": "many"}))
    Image.new("RGB", (8, 8)).save(d / "edited.png", pnginfo=info)
    (d / "junk.safetensors").write_bytes(b"junk")
    (d / "afile").write_text("a file where a folder is expected\n")
    (d / "adir").mkdir()
    (d / "emptyimgs").mkdir()
    good = _lora(d / "good.lora.safetensors", {"st00.attn1.to_q": ((320, 4), (4, 320))})
    _lora(d / "wrongshape.lora.safetensors", {"st00.attn1.to_q": ((1280, 4), (4, 1280))})
    _lora(d / "sdxl.lora.safetensors", {"st20.attn1.to_q": ((320, 4), (4, 320))})
    _lora(d / "te.lora.safetensors", {"te00.q_proj": ((768, 4), (4, 768))})
    _lora(d / "kohya.safetensors", {"x": ((320, 4), (4, 320))}, meta={"ss_network_dim": "4"})
    (d / "truncated.lora.safetensors").write_bytes(good.read_bytes()[:-100])
    _bad_loras(d)
    ck = d / "ck"
    ck.mkdir()
    for name in ("epoch_001", "epoch_002"):
        (ck / f"{name}.lora.safetensors").write_bytes(good.read_bytes())
    (ck / "epoch_003.lora.safetensors").write_bytes(
        (d / "wrongshape.lora.safetensors").read_bytes())
    # a finished run and a run whose train state is damaged
    for name, state in (("done", good.read_bytes()), ("damaged", b"\x00" * 64)):
        (d / name / "checkpoints").mkdir(parents=True)
        (d / name / "checkpoints" / "train_state.safetensors").write_bytes(state)
        (d / name / "history.csv").write_text("epoch,step,loss\n1,1,0.1\n")
    cfg = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    cfg["data"].update(captions=str(d / "captions.csv"), cache_dir=str(d / "cache"))
    cfg["model"]["weights"] = "random"
    cfg["output"] = {**cfg.get("output", {}), "dir": str(d / "run")}
    cfg["train"]["batch_size"] = 2
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    # config files YAML would read with a value silently lost, or could not read at all
    text = (d / "cfg.yaml").read_text()
    (d / "dupkey.yaml").write_text(text + "model:\n  weights: random\n")
    laughs = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (d / "bomb.yaml").write_text(text + "\n".join(laughs) + "\n")
    (d / "deep.yaml").write_text(text + "lists: " + "[" * 200 + "]" * 200 + "\n")
    # run folders to --resume whose config.yaml is missing, not YAML, or not a mapping
    for name, config in (("noconfig", None), ("badconfig", "seed: [1,\n"),
                         ("listconfig", "- seed\n- 42\n")):
        (d / name / "checkpoints").mkdir(parents=True)
        (d / name / "checkpoints" / "train_state.safetensors").write_bytes(good.read_bytes())
        if config is not None:
            (d / name / "config.yaml").write_text(config)
    # image folders for evaluate --images: a bomb-sized PNG, a symbolic link to itself
    (d / "bigimgs").mkdir()
    _png_header(d / "bigimgs" / "1.png", 20_000, 20_000)
    (d / "loopimgs").mkdir()
    os.symlink("1.jpg", d / "loopimgs" / "1.jpg")
    (d / "bombimage.csv").write_text("\n".join([*rows, "7,bigimgs/1.png,a coat,train"]) + "\n")
    sweep = {"base": str(d / "cfg.yaml"), "output": str(d / "sweep"), "runs": [{"lora.rank": 2}]}
    (d / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    (d / "sweep_badgrid.yaml").write_text(yaml.safe_dump(
        {"base": str(d / "cfg.yaml"), "output": str(d / "sweep"), "grid": {"lora.rank": [2, 0]}}))
    (d / "sweep_outfile.yaml").write_text(yaml.safe_dump({**sweep, "output": str(d / "afile")}))
    (d / "sweep_dupkey.yaml").write_text(yaml.safe_dump(sweep) + "output: elsewhere\n")
    (d / "sweep_scalargrid.yaml").write_text(yaml.safe_dump(
        {"base": str(d / "cfg.yaml"), "output": str(d / "sweep"), "grid": {"lora.rank": 4}}))
    (d / "sweep_nochoices.yaml").write_text(yaml.safe_dump(
        {**sweep, "search": {"lora.rank": {"choices": []}}}))
    return d


@pytest.fixture(scope="module")
def taken_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


@pytest.fixture(autouse=True)
def tripwires(monkeypatch):
    """Anything heavy a row reaches fails it."""
    import fashion_sd.interop.weights as interop
    from fashion_sd import images
    from fashion_sd.evaluation import inception
    from fashion_sd.sd import models
    from fashion_sd.training import data, sweep, tuning

    def trip(what):
        def fail(*a, **k):
            raise HeavyWork(f"{what} ran before the bad input was reported")
        return fail

    for module, name in ((models, "build_component"), (images, "check_images"),
                         (inception, "load_extractor"), (data, "encode_dataset"),
                         (sweep, "run_sweep"), (tuning, "tune"), (interop, "import_model"),
                         (interop, "merge_model")):
        monkeypatch.setattr(module, name, trip(f"{module.__name__}.{name}"))


CFG = "--config {w}/cfg.yaml"
GEN = f"generate {CFG} --prompt shirt --out {{w}}/gen"
TRAIN = f"train {CFG}"
EVAL = f"evaluate {CFG} --checkpoints {{w}}/good.lora.safetensors --out {{w}}/eval"
APP = f"app {CFG}"

# (id, command line with {w} for the fixture folder, text the message must contain)
ROWS = [
    # captions
    ("captions: styles missing", "captions {cfg} --styles {w}/nope.csv --out {w}/o/c.csv", "nope.csv: styles.csv not found"),
    ("captions: styles is an image", "captions {cfg} --styles {w}/photo.png --out {w}/o/c.csv", "photo.png: not a UTF-8 text"),
    ("captions: styles lacks columns", "captions {cfg} --styles {w}/nocol.csv --out {w}/o/c.csv", "missing required column(s) subCategory"),
    ("captions: images folder missing", "captions {cfg} --styles {w}/styles.csv --images {w}/noimg --out {w}/o/c.csv", "--images"),
    ("captions: --out is a folder", "captions {cfg} --styles {w}/styles.csv --out {w}/adir", "adir: is a folder"),
    ("captions: --out below a file", "captions {cfg} --styles {w}/styles.csv --out {w}/afile/c.csv", "afile is a file"),
    ("captions: --out read-only", "captions {cfg} --styles {w}/styles.csv --out {ro}/c.csv", "cannot write in"),
    ("captions: config is an image", "captions --config {w}/photo.png --styles {w}/styles.csv", "photo.png: not a text file"),
    ("captions: config key typo", "captions {cfg} --set captions.templat=x --styles {w}/styles.csv", "captions.templat"),
    ("captions: split does not sum to 1", "captions {cfg} --set captions.split.train=0.5 --styles {w}/styles.csv", "must sum to 1"),
    # train
    ("train: captions missing", "train {cfg} --set data.captions={w}/nope.csv", "nope.csv: captions file not found"),
    ("train: captions is an image", "train {cfg} --set data.captions={w}/photo.png", "photo.png: not a UTF-8 text CSV"),
    ("train: unknown split label", "train {cfg} --set data.captions={w}/badsplit.csv", "line 3: split 'training'"),
    ("train: captions lack a column", "train {cfg} --set data.captions={w}/nocaptioncol.csv", "missing column(s) caption"),
    ("train: empty caption", "train {cfg} --set data.captions={w}/emptycaption.csv", "line 4: empty caption"),
    ("train: image missing", "train {cfg} --set data.captions={w}/noimage.csv", "7.jpg"),
    ("train: a bomb-sized image", "train {cfg} --set data.captions={w}/bombimage.csv", "1.png: too large"),
    ("train: batch size 0", "train {cfg} --set train.batch_size=0", "'train.batch_size' must be > 0"),
    ("train: batch larger than the data", "train {cfg} --set train.batch_size=64", "train.batch_size=64"),
    ("train: learning rate nan", "train {cfg} --set train.learning_rate=nan", "'train.learning_rate'"),
    ("train: resolution not /64", "train {cfg} --set data.resolution=100", "'data.resolution'"),
    ("train: output.dir is a file", "train {cfg} --set output.dir={w}/afile", "afile: is a file"),
    ("train: output.dir read-only", "train {cfg} --set output.dir={ro}/run", "cannot write in"),
    ("train: --resume, state damaged", "train {cfg} --set output.dir={w}/damaged --resume", "is damaged"),
    ("train: --resume, nothing there", "train {cfg} --set output.dir={w}/adir --resume", "nothing to resume"),
    ("train: a run is already there", "train {cfg} --set output.dir={w}/done", "already holds a run"),
    ("train: --fresh keeps the old run when input is bad", "train {cfg} --set output.dir={w}/done --set data.captions={w}/badsplit.csv --fresh", "split 'training'"),
    ("train: init_from of another model", "train {cfg} --set lora.init_from={w}/wrongshape.lora.safetensors", "st00.attn1.to_q has A (1280, 4)"),
    ("train: init_from not safetensors", "train {cfg} --set lora.init_from={w}/junk.safetensors", "junk.safetensors: not a readable safetensors"),
    ("train: init_from with text-encoder layers", "train {cfg} --set lora.init_from={w}/te.lora.safetensors", "text-encoder layer te00.q_proj"),
    ("train: init_from with NaN values", "train {cfg} --set lora.init_from={w}/nan.lora.safetensors", "nan.lora.safetensors: 1 tensor(s) hold values that are not finite (st00.attn1.to_q.lora_b: 1 NaN)"),
    ("train: config with a key given twice", "train --config {w}/dupkey.yaml", "key 'model' is given twice, on lines"),
    ("train: config whose aliases explode", "train --config {w}/bomb.yaml", "bomb.yaml: expands to more than 100,000 values"),
    ("train: config nested too deep", "train --config {w}/deep.yaml", "deep.yaml: nested more than 32 levels deep"),
    ("train: --set with a key given twice", 'train {cfg} --set captions.include={{"articleType":[Tops],"articleType":[Tshirts]}}', "key 'articleType' is given twice, on line 1"),
    ("train: learning rate 1e308", "train {cfg} --set train.learning_rate=1e308", "'train.learning_rate' must be a positive number, at most 1"),
    ("train: text-encoder rate inf", "train {cfg} --set train.text_encoder_lr=inf", "'train.text_encoder_lr' must be above 0 and at most 1"),
    ("train: weight decay 1e300", "train {cfg} --set train.weight_decay=1e300", "'train.weight_decay' must be from 0 to 1"),
    ("train: lora alpha 1e30", "train {cfg} --set lora.alpha=1e30", "'lora.alpha' must be at most 64 x lora.rank"),
    ("train: min loss scale 1e300", "train {cfg} --set train.min_loss_scale=1e300", "'train.min_loss_scale' must be above 0 and at most 1e12"),
    ("train: epochs beyond any counter", "train {cfg} --set train.epochs=100000000000000000000", "'train.epochs' must be below 2**31"),
    ("train: sample guidance nan", "train {cfg} --set train.sample_guidance=nan", "'train.sample_guidance' must be from 0 to 100"),
    ("train: sample guidance 1e9", "train {cfg} --set train.sample_guidance=1e9", "'train.sample_guidance' must be from 0 to 100"),
    ("train: a negative sample seed", "train {cfg} --set train.sample_seeds=[0,-1]", "'train.sample_seeds' must each be from 0 to 4294967295"),
    ("train: seed 2**32", "train {cfg} --set seed=4294967296", "'seed' must be from 0 to 4294967295"),
    ("train: --resume, no config.yaml", "train {cfg} --set output.dir={w}/noconfig --resume", "noconfig/config.yaml not found"),
    ("train: --resume, config.yaml not YAML", "train {cfg} --set output.dir={w}/badconfig --resume", "badconfig/config.yaml: not valid YAML"),
    ("train: --resume, config.yaml not a mapping", "train {cfg} --set output.dir={w}/listconfig --resume", "listconfig/config.yaml: expected a mapping"),
    # generate
    ("generate: guidance nan", "{gen} --guidance nan", "--guidance nan"),
    ("generate: guidance inf", "{gen} --guidance inf", "--guidance inf"),
    ("generate: negative guidance", "{gen} --guidance -3", "--guidance -3"),
    ("generate: lora strength nan", "{gen} --lora-strength nan", "--lora-strength nan"),
    ("generate: batch size 0", "{gen} --batch-size 0", "--batch-size 0"),
    ("generate: steps 0", "{gen} --steps 0", "--steps 0"),
    ("generate: no images", "{gen} --num-images 0", "--num-images 0"),
    ("generate: resolution not /64", "{gen} --resolution 100", "--resolution 100"),
    ("generate: LoRA of another model", "{gen} --lora {w}/wrongshape.lora.safetensors", "wrongshape.lora.safetensors: st00.attn1.to_q"),
    ("generate: LoRA layer not in SD 1.x", "{gen} --lora {w}/sdxl.lora.safetensors", "st20.attn1.to_q is not in Stable Diffusion 1.x"),
    ("generate: LoRA truncated", "{gen} --lora {w}/truncated.lora.safetensors", "truncated"),
    ("generate: kohya LoRA not imported", "{gen} --lora {w}/kohya.safetensors", "convert import-lora"),
    ("generate: LoRA with NaN values", "{gen} --lora {w}/nan.lora.safetensors", "st00.attn1.to_q.lora_b: 1 NaN"),
    ("generate: LoRA with Inf values", "{gen} --lora {w}/inf.lora.safetensors", "inf.lora.safetensors: 1 tensor(s) hold values that are not finite (st00.attn1.to_q.lora_a: 2 Inf)"),
    ("generate: LoRA metadata not a mapping", "{gen} --lora {w}/metalist.lora.safetensors", "metalist.lora.safetensors: not a readable safetensors file (its __metadata__ is a list, not a mapping"),
    ("generate: LoRA rank not a number", "{gen} --lora {w}/rankword.lora.safetensors", "rankword.lora.safetensors: metadata rank 'four' is not a finite number"),
    ("generate: LoRA rank nan", "{gen} --lora {w}/ranknan.lora.safetensors", "metadata rank 'nan' is not a finite number"),
    ("generate: LoRA alpha inf", "{gen} --lora {w}/alphainf.lora.safetensors", "alphainf.lora.safetensors: metadata alpha 'inf' is not a finite number"),
    ("generate: LoRA targets not JSON", "{gen} --lora {w}/targetsnotjson.lora.safetensors", "metadata targets '[to_q, to_k' is not JSON"),
    ("generate: LoRA tensors overlap", "{gen} --lora {w}/overlap.lora.safetensors", "overlap.lora.safetensors: not a readable safetensors file (tensors 'st00.attn1.to_q.lora_a' and 'st00.attn1.to_q.lora_b' overlap"),
    ("generate: LoRA offsets backwards", "{gen} --lora {w}/backwards.lora.safetensors", "data_offsets [5120, 0] that run backwards"),
    ("generate: LoRA header nested too deep", "{gen} --lora {w}/deep.lora.safetensors", "deep.lora.safetensors: not a readable safetensors file (its safetensors header is nested too deeply"),
    ("generate: config with a key given twice", "generate --config {w}/dupkey.yaml --prompt shirt --out {w}/gen", "dupkey.yaml: key 'model' is given twice"),
    ("generate: --seed 2**32", "{gen} --seed 4294967296", "--seed 4294967296"),
    ("generate: --out is a file", "generate {cfg} --prompt shirt --out {w}/afile", "afile: is a file"),
    ("generate: an --out name longer than a file name can be", "generate {cfg} --prompt shirt --out {w}/xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", "more than the 255 a file name can have"),
    ("captions: a --styles name longer than a file name can be", "captions {cfg} --styles {w}/ssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssss.csv --out {w}/o/c.csv", "more than the 255 a file name can have"),
    ("generate: prompts file is an image", "{gen} --prompts-file {w}/photo.png", "--prompts-file"),
    ("generate: --from-png not a PNG", "generate {cfg} --from-png {w}/notes.pt --out {w}/gen", "--from-png"),
    ("generate: --from-png without settings", "generate {cfg} --from-png {w}/photo.png --out {w}/gen", "no fashion-sd settings"),
    ("generate: --from-png with a setting of the wrong kind", "generate {cfg} --from-png {w}/edited.png --out {w}/gen", "edited.png: not a PNG written by this tool (its setting 'steps' is 'many', not a whole number of steps)"),
    ("generate: the last image's seed past 2**32 - 1", "{gen} --seed 4294967295 --num-images 2", "the last image's seed 4294967296 is past 2^32 - 1; give --seed 4294967294 or less"),
    # evaluate
    ("evaluate: glob matches nothing", "evaluate {cfg} --checkpoints {w}/none*.lora.safetensors --out {w}/eval", "no .lora.safetensors checkpoint found"),
    ("evaluate: third checkpoint of another model", "evaluate {cfg} --checkpoints {w}/ck --out {w}/eval", "epoch_003.lora.safetensors: st00.attn1.to_q"),
    ("evaluate: one image", "{ev} --num-images 1", "--num-images must be >= 2"),
    ("evaluate: --out is a file", "evaluate {cfg} --checkpoints {w}/good.lora.safetensors --out {w}/afile", "afile: is a file"),
    ("evaluate: empty split", "{ev} --set data.captions={w}/notest.csv --split test", "the 'test' split is empty"),
    ("evaluate: checkpoint not safetensors", "evaluate {cfg} --checkpoints {w}/junk.safetensors --out {w}/eval", "junk.safetensors: not a readable safetensors"),
    ("evaluate: --images folder missing", "evaluate --images {w}/noimg --captions {w}/captions.csv --out {w}/j", "--images"),
    ("evaluate: --images folder with no image of the captions", "evaluate --images {w}/emptyimgs --captions {w}/captions.csv --out {w}/j", "emptyimgs: none of its 0 file(s) matches a row"),
    ("evaluate: a split of one image", "{ev} --set data.captions={w}/onetest.csv --split test", "the 'test' split has one image"),
    ("evaluate: --images without --captions", "evaluate --images {w}/images --out {w}/j", "go together"),
    ("evaluate: --images with a bomb-sized image", "evaluate --images {w}/bigimgs --captions {w}/captions.csv --out {w}/j", "1.png: too large"),
    ("evaluate: --real folder missing", "evaluate --images {w}/images --real {w}/noimg --out {w}/d", "--real"),
    ("evaluate: --real folder with no image", "evaluate --images {w}/images --real {w}/emptyimgs --out {w}/d", "emptyimgs: 0 image(s)"),
    ("evaluate: --real without --images", "evaluate --real {w}/images --out {w}/d", "--real compares folders"),
    ("evaluate: eval.dinov2 folder missing", "{ev} --set eval.dinov2=hf:{w}/nodino", "hf:"),
    ("evaluate: one bootstrap resample", "{ev} --set eval.bootstrap=1", "eval.bootstrap"),
    ("evaluate: --real with --captions", "evaluate --images {w}/images --real {w}/images --captions {w}/captions.csv --out {w}/d", "no --captions"),
    ("evaluate: --real with a bomb-sized image", "evaluate --images {w}/images --real {w}/bigimgs --out {w}/d", "1.png: too large"),
    ("evaluate: --images with a symbolic-link loop", "evaluate --images {w}/loopimgs --captions {w}/captions.csv --out {w}/j", "1.jpg: unreadable: a symbolic-link loop"),
    ("evaluate: checkpoint with Inf values", "evaluate {cfg} --checkpoints {w}/inf.lora.safetensors --out {w}/eval", "st00.attn1.to_q.lora_a: 2 Inf"),
    ("evaluate: guidance nan", "{ev} --set eval.guidance=nan", "'eval.guidance' must be from 0 to 100"),
    ("evaluate: steps 1e6", "{ev} --set eval.steps=1000000", "'eval.steps' must be from 1 to 1000"),
    ("evaluate: CLIP folder without a preset", "{ev} --set eval.clip=local:{w}/adir", "adir; give a keras-hub CLIP preset folder"),
    ("evaluate: transformers CLIP folder without its config", "{ev} --set eval.clip=hf:{w}/adir", "adir; give the folder a transformers CLIPModel was saved to"),
    ("evaluate: CLIP spec unknown", "{ev} --set eval.clip=openai", "'eval.clip' must be auto, pretrained"),
    ("evaluate: select clip with CLIP off", "{ev} --set eval.select=clip --set eval.clip=none", "'eval.select' clip needs CLIP"),
    ("evaluate: --images with a CLIP folder that is not one", "evaluate --images {w}/images --captions {w}/captions.csv --out {w}/j --set eval.clip=local:{w}/adir", "no config.json"),
    ("train: eval_every with a CLIP folder that is not one", "train {cfg} --set train.eval_every=1 --set eval.clip=local:{w}/adir", "no config.json"),
    ("train: eval_every with one image", "train {cfg} --set train.eval_every=1 --set train.eval_images=1", "'train.eval_images' must be >= 2"),
    ("train: grad_accum longer than the whole run", "train {cfg} --set train.grad_accum=1000", "train.grad_accum=1000: the run has"),
    ("train: no sample seeds", "train {cfg} --set train.sample_seeds=[]", "'train.sample_seeds' must list at least one seed"),
    ("train: a lora.targets typo", "train {cfg} --set lora.targets=[to_q,to_kk]", "'to_kk' match no attention projection"),
    ("train: a one-element data.resolution", "train {cfg} --set data.resolution=[256]", "'data.resolution' must be a positive multiple of 64"),
    ("captions: a template field with a format spec", "captions {cfg} --set captions.template={{year:04d}}-{{article}}", "'captions.template' cannot be filled"),
    ("train: multi_worker without TF_CONFIG", "train {cfg} --set train.strategy=multi_worker", "multi_worker needs TF_CONFIG"),
    ("train: tpu without a TPU", "train {cfg} --set train.strategy=tpu", "no TPU is reachable"),
    ("train: strategy unknown", "train {cfg} --set train.strategy=horovod", "'train.strategy'"),
    ("train: remote output.dir not writable", "train {cfg} --set output.dir=file://{w}/afile/run", "output.dir: cannot write to file://"),
    ("train: remote captions missing", "train {cfg} --set data.captions=file://{w}/nope.csv", "nope.csv: captions file not found"),
    # workers (the local multi-worker launcher)
    ("workers: one worker", "workers 1 -- {cfg}", "give 2 or more"),
    ("workers: no train arguments", "workers 2", "give the train arguments after --"),
    ("workers: config missing", "workers 2 -- --config {w}/nope.yaml", "workers: {w}/nope.yaml"),
    ("workers: a bad value, found before any worker starts", "workers 2 -- {cfg} --set lora.rank=0", "--set: 'lora.rank' must be > 0"),
    # sweep
    ("sweep: file missing", "sweep --config {w}/nope.yaml", "nope.yaml: sweep file not found"),
    ("sweep: file is an image", "sweep --config {w}/photo.png", "photo.png: not a text file"),
    ("sweep: a run with rank 0", "sweep --config {w}/sweep_badgrid.yaml", "'lora.rank' must be > 0"),
    ("sweep: a grid value that is not a list", "sweep --config {w}/sweep_scalargrid.yaml", "grid.lora.rank: give a list of one or more values"),
    ("sweep: a search with no choices", "sweep --config {w}/sweep_nochoices.yaml", "search.lora.rank: give"),
    ("sweep: --only unknown run", "sweep --config {w}/sweep.yaml --only r9", "--only r9"),
    ("sweep: output is a file", "sweep --config {w}/sweep_outfile.yaml", "afile: is a file"),
    ("sweep: a key given twice", "sweep --config {w}/sweep_dupkey.yaml", "sweep_dupkey.yaml: key 'output' is given twice"),
    ("sweep: no trials", "sweep --config {w}/sweep.yaml --tuner random --max-trials 0", "--max-trials 0"),
    ("sweep: --distributed without KerasTuner's variables", "sweep --config {w}/sweep.yaml --distributed", "KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT not set"),
    # convert
    ("convert: import-lora of a non-tensor file", "convert import-lora --from {w}/notes.pt --out {w}/x.lora.safetensors", "notes.pt: not a tensor file"),
    ("convert: import-lora source missing", "convert import-lora --from {w}/nope.safetensors --out {w}/x.lora.safetensors", "nope.safetensors: LoRA file not found"),
    ("convert: import-lora of junk", "convert import-lora --from {w}/junk.safetensors --out {w}/x.lora.safetensors", "junk.safetensors: not a readable safetensors"),
    ("convert: export-lora of a truncated file", "convert export-lora --lora {w}/truncated.lora.safetensors --format kohya --out {w}/x.safetensors", "truncated"),
    ("convert: merge of another model's LoRA", "convert merge --weights random --lora {w}/wrongshape.lora.safetensors --out {w}/m", "st00.attn1.to_q"),
    ("convert: export-lora of a LoRA with NaN values", "convert export-lora --lora {w}/nan.lora.safetensors --format kohya --out {w}/x.safetensors", "1 NaN"),
    ("convert: export-lora of a LoRA whose tensors overlap", "convert export-lora --lora {w}/overlap.lora.safetensors --format kohya --out {w}/x.safetensors", "overlap"),
    ("convert: export-lora --out is a folder", "convert export-lora --lora {w}/good.lora.safetensors --format kohya --out {w}/adir", "adir: is a folder"),
    ("convert: merge strength nan", "convert merge --weights random --lora {w}/good.lora.safetensors --strength nan --out {w}/m", "--strength nan"),
    ("convert: merge --out is a file", "convert merge --weights random --lora {w}/good.lora.safetensors --out {w}/afile", "afile: is a file"),
    ("convert: import-model source missing", "convert import-model --from {w}/nope --out {w}/m", "nope: not found"),
    ("convert: import-model of a text file, before torch loads", "convert import-model --from {w}/notes.pt --out {w}/m", "notes.pt: not a tensor file: neither safetensors nor a PyTorch checkpoint"),
    ("convert: export-lora --out is its --lora", "convert export-lora --lora {w}/good.lora.safetensors --format kohya --out {w}/good.lora.safetensors", "good.lora.safetensors: the same file as --lora"),
    ("convert: import-lora --out is its --from", "convert import-lora --from {w}/kohya.safetensors --out {w}/./kohya.safetensors", "kohya.safetensors: the same file as --from"),
    # app
    ("app: port taken", "{app} --port {port}", "--port {port}: already in use"),
    ("app: port out of range", "{app} --port 70000", "--port 70000"),
    ("app: run folder missing", "{app} --run {w}/norun", "--run"),
    ("app: LoRA of another model", "{app} --lora {w}/wrongshape.lora.safetensors", "st00.attn1.to_q"),
    ("app: LoRA with NaN values", "{app} --lora {w}/nan.lora.safetensors", "1 NaN"),
    ("app: queue of 0", "{app} --queue-size 0", "--queue-size 0"),
    ("app: auth without password", "{app} --auth alice", "--auth must be USER:PASS"),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with its content's hash: what a row must not change."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(root)) + "/"] = ""
    return out


def test_at_least_forty_rows_across_the_seven_commands():
    commands = {line.split()[0].strip("{}") for _, line, _ in ROWS}
    commands = {{"gen": "generate", "ev": "evaluate"}.get(c, c) for c in commands}
    assert commands == set(cli.COMMANDS) and len(ROWS) >= 40


@pytest.mark.parametrize(("line", "culprit"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_fails_fast(w, taken_port, capsys, caplog, line, culprit):
    ro = _unwritable(w) if "{ro}" in line else None
    if "{ro}" in line and ro is None:
        pytest.skip("no unwritable folder on this machine")
    fill = {"w": w, "cfg": CFG.format(w=w), "gen": GEN.format(w=w), "ev": EVAL.format(w=w),
            "app": APP.format(w=w), "port": taken_port, "ro": ro}
    argv = line.format(**fill).split()
    before = _snapshot(w)
    caplog.set_level(logging.WARNING)
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert culprit.format(**fill) in err, err
    assert "Traceback" not in err and err.startswith("error: ")
    assert "weights_only" not in err  # never the advice to load pickles unsafely
    assert _snapshot(w) == before  # nothing written, nothing deleted


# ---- suspicious but usable: kept, and reported


def test_split_labels_that_match_after_trimming_are_used_and_reported(w, tmp_path, caplog):
    from fashion_sd.catalogue.captions import read_captions

    rows = (w / "captions.csv").read_text().splitlines()
    rows[2] = rows[2].replace(",train", ",Train ")
    (tmp_path / "c.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level(logging.WARNING):
        table = read_captions(tmp_path / "c.csv")
    assert table.split.tolist() == ["train"] * 3 + ["val", "test", "test"]  # no row dropped
    assert "1 split label(s) read after trimming and lower-casing, e.g. line 3 'Train ' -> 'train'" in caplog.text


def test_values_outside_the_vocabulary_are_kept_and_flagged(tmp_path):
    import pandas as pd

    from fashion_sd.catalogue import captions
    from fashion_sd.config import load_config

    styles = write_styles(tmp_path / "styles.csv", [
        "1,Men,Apparel,Topwear,Tshirts,Blue,Summer,2011,Casual,a",
        "2,Alien,Apparel,Topwear,Tshirts,Blue,Monsoon,2011,Casual,b",
        "3,Women,Apparel,Topwear,Hoverboards,Red,Fall,2012,Casual,c",
        "4,Women,Apparel,Topwear,Tops,Red,Fall,2012,Casual,d"])
    cfg = load_config(ROOT / "configs/demo.yaml").captions
    with pytest.warns(UserWarning, match="Hoverboards"):
        result = captions.build_captions(styles, cfg, 0)
    assert len(result.table) == 4  # kept, as written
    assert list(zip(result.flagged.line, result.flagged.id, result.flagged.column,
                    result.flagged.value)) == [(3, "2", "gender", "Alien"), (3, "2", "season", "Monsoon"),
                                               (4, "3", "articleType", "Hoverboards")]
    text = captions.format_summary(result.summary)
    assert "unusual gender (kept; see flagged.csv): 'Alien' 1" in text
    assert "unusual season (kept; see flagged.csv): 'Monsoon' 1" in text
    captions.write_outputs(result, tmp_path / "out" / "captions.csv")
    written = pd.read_csv(tmp_path / "out" / "flagged.csv", dtype=str)
    assert written.value.tolist() == ["Alien", "Monsoon", "Hoverboards"]


# ---- the tables the checks read


def test_the_layer_table_matches_the_real_text_encoder(small_parts):
    from fashion_sd.sd.lora import text_encoder_projections
    from fashion_sd.sd.lora_file import expected_kernel_shapes

    got = {k: tuple(d.kernel.shape) for k, d in text_encoder_projections(small_parts["text_encoder"]).items()}
    assert got == {k: v for k, v in expected_kernel_shapes().items() if k.startswith("te")}


def test_the_header_reader_agrees_with_safetensors(w):
    from safetensors import safe_open

    from fashion_sd.safetensors_file import safetensors_header

    entries, meta = safetensors_header(w / "good.lora.safetensors")
    with safe_open(str(w / "good.lora.safetensors"), "numpy") as fh:
        assert meta == fh.metadata()
        assert {k: list(e["shape"]) for k, e in entries.items()} == {
            k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}


def test_header_faults_are_the_format_readers_own(w):
    """Every header fault the check refuses, safetensors' own reader refuses too (the check is
    the format, not a stricter one); the value faults (NaN, rank text) it reads without
    complaint, which is why the check reads them."""
    from safetensors import safe_open

    for name in ("metalist", "overlap", "backwards", "deep"):
        with pytest.raises(Exception):  # noqa: B017, PT011 - SafetensorError, or its panic
            with safe_open(str(w / f"{name}.lora.safetensors"), "numpy") as fh:
                [fh.get_tensor(k) for k in fh.keys()]
    for name in ("nan", "inf", "rankword", "targetsnotjson"):
        with safe_open(str(w / f"{name}.lora.safetensors"), "numpy") as fh:
            [fh.get_tensor(k) for k in fh.keys()]


def test_the_api_answers_non_numbers_with_a_message_not_a_traceback(tmp_path, caplog):
    """The app's /generate endpoint, served, sent text and NaN where numbers go: each answer
    names the field; nothing reaches the model and the server logs no traceback."""
    from types import SimpleNamespace

    from gradio_client import Client

    from fashion_sd.config import load_config
    from fashion_sd.serving.assistant import Assistant
    from fashion_sd.serving.webapp import build_app, launch

    class Stub:  # Assistant's own generate(); everything after its checks is a tripwire
        generate = Assistant.generate
        random_init = False

        def __init__(self):
            self.cfg = load_config(ROOT / "configs/demo.yaml",
                                   [f"data.captions={tmp_path}/none.csv"])
            self.comps = SimpleNamespace(tokenizer=SimpleNamespace(encode=lambda p: p.split()))
            self.gallery = SimpleNamespace(folder=tmp_path, items=lambda: [])

        def checkpoints(self):
            return []

        def find_checkpoint(self, name):
            raise HeavyWork("a request with bad numbers reached the checkpoint lookup")

    stub = Stub()
    app = build_app(stub)
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    caplog.set_level(logging.ERROR)
    launch(app, stub, port=number, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{number}/", verbose=False)
        for field, value, message in (("num_images", "four", "num images must be a number"),
                                      ("steps", "abc", "steps must be a number"),
                                      ("guidance", "NaN", "guidance must be between 0 and 30"),
                                      ("strength", [1], "strength must be a number"),
                                      ("seed", "1.5", "seed must be a whole number"),
                                      ("seed", "x", "seed must be a number")):
            args = {"prompt": "a shirt", "seed": 1, "num_images": 1, "steps": 2, field: value}
            with pytest.raises(Exception, match=message):
                client.predict(**args, api_name="/generate")
        with pytest.raises(Exception, match="prompt must be text"):
            client.predict(prompt=5, seed=1, num_images=1, steps=2, api_name="/generate")
        with pytest.raises(Exception, match="prompt is required"):  # a script that sent none
            client.predict(prompt=None, seed=1, num_images=1, steps=2, api_name="/generate")
    finally:
        app.close()
    assert "Traceback" not in caplog.text and "HeavyWork" not in caplog.text
