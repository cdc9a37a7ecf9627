"""The assistant's logic without a browser or a model: pickers, prompts, checkpoints, gallery."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from fashion_sd.caption_template import DERIVED_FIELDS, PAPER_TEMPLATE, CaptionError
from fashion_sd.serving.assistant import (
    ATTRIBUTES,
    BASE,
    Gallery,
    RequestError,
    build_prompt,
    caption_of,
    check_settings,
    list_checkpoints,
    prompt_warnings,
    vocabulary,
)


def test_pickers_offer_the_catalogues_own_values_with_counts(demo_captions):
    vocab = vocabulary(demo_captions)
    table = pd.read_csv(demo_captions, dtype=str, keep_default_na=False)
    for attr in ATTRIBUTES:
        column = table[DERIVED_FIELDS[attr]]
        expected = column[column != ""].value_counts().to_dict()
        assert dict(vocab[attr]) == expected, attr
    years = [int(y) for y, _ in vocab["year"]]
    assert years == sorted(years, reverse=True)
    counts = [n for _, n in vocab["article"]]
    assert counts == sorted(counts, reverse=True)


def test_vocabulary_errors_name_the_file(tmp_path):
    with pytest.raises(CaptionError, match="captions file not found"):
        vocabulary(tmp_path / "none.csv")
    (tmp_path / "c.csv").write_text("id,caption\n1,x\n")
    with pytest.raises(CaptionError, match=r"c\.csv: no column\(s\) year"):
        vocabulary(tmp_path / "c.csv")


def test_prompt_from_pickers_is_the_training_caption(demo_captions):
    """Through the caption builder, so the app's prompts are the captions the model learned."""
    table = pd.read_csv(demo_captions, dtype=str, keep_default_na=False)
    for _, row in table.iterrows():
        picked = {a: row[DERIVED_FIELDS[a]] for a in ATTRIBUTES}
        assert build_prompt(PAPER_TEMPLATE, picked) == row["caption"]


def test_free_text_extends_or_replaces_the_prompt():
    picked = {"gender": "Men", "article": "Sweaters", "colour": "White", "year": ""}
    assert build_prompt(PAPER_TEMPLATE, picked) == "an image of a White Men's Sweater"
    assert build_prompt(PAPER_TEMPLATE, picked, "with a hood") == \
        "an image of a White Men's Sweater, with a hood"
    assert build_prompt(PAPER_TEMPLATE, picked, "a red scarf", replace=True) == "a red scarf"
    assert build_prompt(PAPER_TEMPLATE, {"article": ""}, "a red scarf") == "a red scarf"
    with pytest.raises(RequestError) as err:
        build_prompt(PAPER_TEMPLATE, {"colour": "Red"})
    assert err.value.field == "article"
    with pytest.raises(RequestError) as err:
        build_prompt(PAPER_TEMPLATE, picked, "  ", replace=True)
    assert err.value.field == "free_text"


def test_prompt_checks_warn_on_truncation_and_refuse_empty():
    from fashion_sd.sd.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    assert prompt_warnings("an image of a Men's Sweater", tok) == []
    long = " ".join(["red"] * 80)
    (note,) = prompt_warnings(long, tok)
    assert "82 tokens" in note and "77" in note  # 80 words + start and end tokens
    assert prompt_warnings(" ".join(["red"] * 75), tok) == []  # exactly 77 with start and end
    with pytest.raises(RequestError) as err:
        prompt_warnings("   ", tok)
    assert err.value.field == "prompt"


@pytest.mark.parametrize("args, field", [
    ((0, 10, 7.5, 1.0, 0), "num_images"), ((9, 10, 7.5, 1.0, 0), "num_images"),
    ((1, 0, 7.5, 1.0, 0), "steps"), ((1, 151, 7.5, 1.0, 0), "steps"),
    ((1, 2.5, 7.5, 1.0, 0), "steps"), ((1, 10, -1, 1.0, 0), "guidance"),
    ((1, 10, float("nan"), 1.0, 0), "guidance"), ((1, 10, 7.5, 1.6, 0), "strength"),
    ((1, 10, 7.5, 1.0, -3), "seed"), ((1, 10, 7.5, 1.0, "abc"), "seed"),
    (("x", 10, 7.5, 1.0, 0), "num_images"),
])
def test_out_of_range_settings_name_their_field(args, field):
    with pytest.raises(RequestError) as err:
        check_settings(*args)
    assert err.value.field == field


def test_settings_are_typed():
    assert check_settings(8.0, "12", 0, 1.5, 2**31 - 1) == {
        "num_images": 8, "steps": 12, "guidance": 0.0, "strength": 1.5, "seed": 2**31 - 1}


def _lora_file(path, epoch, step):
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"st00.attn1.to_q.lora_a": np.zeros((4, 2), np.float32),
               "st00.attn1.to_q.lora_b": np.zeros((2, 4), np.float32)}, str(path),
              metadata={"format": "fashion-sd-lora", "rank": "2", "alpha": "2.0",
                        "targets": '["to_q"]', "epoch": str(epoch), "step": str(step)})
    return path


def _run(tmp_path, scored=True):
    run = tmp_path / "run"
    for e in (1, 2, 3):
        _lora_file(run / "checkpoints" / f"epoch_{e:03d}.lora.safetensors", e, 10 * e)
    _lora_file(run / "checkpoints" / "best.lora.safetensors", 2, 20)
    (run / "checkpoints" / "train_state.safetensors").write_bytes(b"not a lora")
    pd.DataFrame({"epoch": [1.0, 2.0, 3.0], "step": [10, 20, 30], "loss": [1, 1, 1],
                  "val_loss": [0.5, 0.3, 0.4]}).to_csv(run / "history.csv", index=False)
    if scored:
        (run / "eval").mkdir()
        pd.DataFrame({"checkpoint": ["base", "epoch_001", "epoch_002", "epoch_003", "epoch_003"],
                      "fid": [90.0, 50.0, 60.0, 70.0, 40.0],
                      "kid_mean": [0.09, 0.05, 0.06, 0.07, 0.04],
                      "comparable": [True] * 5}).to_csv(run / "eval" / "fid.csv", index=False)
    return run


def test_checkpoints_listed_with_epoch_val_loss_and_scores(tmp_path):
    rows = {c.name: c for c in list_checkpoints(_run(tmp_path))}
    assert list(rows) == [BASE, "best", "epoch_001", "epoch_002", "epoch_003"]
    assert rows[BASE].path is None and rows[BASE].fid == 90.0
    e2 = rows["epoch_002"]
    assert (e2.epoch, e2.step, e2.val_loss, e2.fid, e2.kid) == (2.0, 20, 0.3, 60.0, 0.06)
    # the latest scoring of a checkpoint counts; the lowest FID is best
    assert rows["epoch_003"].fid == 40.0 and rows["epoch_003"].best
    assert [c.name for c in rows.values() if c.best] == ["epoch_003"]
    assert rows["epoch_003"].label == ("epoch_003 · epoch 3 · val loss 0.4000 · FID 40 · "
                                       "KID 0.04  ★ best")
    assert rows[BASE].label.startswith("base model · FID 90")


def test_unscored_run_marks_lowest_val_loss(tmp_path):
    rows = list_checkpoints(_run(tmp_path, scored=False))
    assert [c.name for c in rows if c.best] == ["epoch_002"]
    assert all(c.fid is None for c in rows)
    assert [c.name for c in list_checkpoints(None)] == [BASE]


def test_checkpoint_list_stays_inside_the_run(tmp_path):
    run = _run(tmp_path)
    outside = _lora_file(tmp_path / "elsewhere" / "secret.lora.safetensors", 1, 1)
    os.symlink(outside, run / "checkpoints" / "linked.lora.safetensors")
    names = [c.name for c in list_checkpoints(run)]
    assert "linked" not in names and "secret" not in names
    # a file the operator named on the command line is offered
    assert "secret" in [c.name for c in list_checkpoints(run, [outside])]


def test_gallery_keeps_images_and_settings_across_restarts(tmp_path):
    from PIL import Image

    from fashion_sd.serving.generate import read_png_settings

    gallery = Gallery(tmp_path / "assistant")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    paths = [gallery.save(img, {"prompt": f"p{i}", "seed": i, "checkpoint": "epoch_001",
                                "lora_strength": 0.5}) for i, img in enumerate(images)]
    assert len(set(paths)) == 3
    (tmp_path / "assistant" / "zz_not_ours.png").write_bytes(b"garbage")
    reopened = Gallery(tmp_path / "assistant")
    items = reopened.items()
    assert sorted(p for p, _ in items) == sorted(paths)  # the foreign file is skipped
    for path, img in zip(paths, images):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), img)
        assert read_png_settings(path)["prompt"] == f"p{paths.index(path)}"
    assert not list((tmp_path / "assistant").glob("*.tmp*"))
    assert caption_of(items[0][1]) == "seed 2 · epoch_001 ×0.5"
    assert caption_of({"seed": 4, "checkpoint": BASE, "lora_strength": None}) == "seed 4 · base"
    assert json.loads(Image.open(paths[0]).text["fashion-sd"])["seed"] == 0


def _app_script(*args):
    import subprocess
    import sys

    from conftest import ROOT

    return subprocess.run([sys.executable, str(ROOT / "scripts/app.py"), "--config",
                           str(ROOT / "configs/demo.yaml"), *args], capture_output=True,
                          text=True, timeout=300)


def test_app_command_line_is_checked_before_any_model_is_built(tmp_path):
    r = _app_script("--run", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "--run" in r.stderr and "no such folder" in r.stderr
    r = _app_script("--lora", str(tmp_path / "none.lora.safetensors"))
    assert r.returncode == 2 and "none.lora.safetensors: LoRA checkpoint not found" in r.stderr
    r = _app_script("--auth", "just-a-name")
    assert r.returncode == 2 and "--auth must be USER:PASS" in r.stderr
    r = _app_script("--port", "70000")
    assert r.returncode == 2 and "--port 70000" in r.stderr
    assert "building" not in r.stderr


def test_auth_can_come_from_a_file(tmp_path):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("app_script", ROOT / "scripts/app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    (tmp_path / "auth").write_text("ana:s3cr:et\n")
    assert mod.parse_auth(f"@{tmp_path / 'auth'}") == ("ana", "s3cr:et")
    assert mod.parse_auth("bo:pw") == ("bo", "pw") and mod.parse_auth(None) is None
