"""The model card of every LoRA a user takes away: a README.md the Hugging Face Hub parses, whose
every figure is read from a hand-made run folder's own files and checked against them here."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image

from fashion_sd import model_card, rundir
from fashion_sd.config import Config
from fashion_sd.evaluation.evaluate import BASE, COLUMNS, REAL
from fashion_sd.rundir import RunDir
from fashion_sd.sd import lora_file
from fashion_sd.sd.weight_files import PRETRAINED_ID

LAYERS = ("st00.attn1.to_q", "st00.attn2.to_k")  # SD 1.x names, so the exporter takes them
CAPTIONS = [("train", "an image of a 2011 Casual Fall White Men's Sweater"),
            ("train", "an image of a 2012 Casual Summer Grey Women's Dress"),
            ("val", "an image of a 2011 Sports Fall White Men's T-Shirt"),
            ("test", "an image of a 2012 Casual Summer Blue Women's Top"),
            ("test", "an image of a 2012 Casual Summer Blue Women's Top"),  # a repeat: once
            ("test", "an image of a 2011 Formal Winter Black Men's Blazer"),
            ("test", "an image of a 2013 Casual Spring Red Girls' Skirt"),
            ("test", "an image of a 2011 Casual Fall Green Men's Jacket")]
RECORD = {"status": "finished", "step": 160, "epoch": 4.0, "train_images": 35, "val_images": 4,
          "distinct_captions": 31, "best_by": "val_loss", "best_val_loss": 0.1234567,
          "final_loss": 0.2109876, "final_val_loss": 0.1300001, "precision": "float32",
          "backend": "tensorflow", "trainable_parameters": 797184, "skipped_steps": 0,
          "options": {"snr_gamma": 5.0, "noise_offset": 0.0, "ema_decay": None}}


def write_lora(path, step: int, epoch: float, random_init: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in LAYERS:
        fan_in = 320 if layer.endswith("to_q") else 768
        tensors[f"{layer}.lora_a"] = rng.normal(size=(fan_in, 2)).astype(np.float32)
        tensors[f"{layer}.lora_b"] = rng.normal(size=(2, 320)).astype(np.float32)
    meta = {"rank": "2", "alpha": "4.0", "targets": json.dumps(["to_q", "to_k"]),
            "layers": json.dumps(list(LAYERS)),
            "base_weights": "random-init(seed=42)" if random_init else PRETRAINED_ID,
            "random_init": str(random_init).lower(), "caption_template": Config().captions.template,
            "resolution": "256", "lora_init": "kaiming", "step": str(step), "epoch": f"{epoch:.4f}"}
    return lora_file.write(path, tensors, meta)


def scores_row(name: str, step, rng) -> dict:
    row = {c: float(rng.uniform(0.01, 300)) for c in COLUMNS}
    row.update(checkpoint=name, epoch=step / 40 if step else math.nan,
               step=float(step) if step else math.nan, kid_subset_size=17.0, n_real=34.0,
               n_generated=40.0, backend="tfhub-inception", protocol="clean", comparable=True,
               clip_model="openai/clip-vit-large-patch14", dinov2_model="dinov2_base",
               weights_source=PRETRAINED_ID, settings="a1b2c3d4e5f6", notes="", selected=False)
    if name == REAL:
        row.update(fid=math.nan, fid_se=math.nan, kid_mean=math.nan, kid_std=math.nan)
    return row


def make_run(root, *, random_init=False, scored=True, captions=True, stale_best=False) -> RunDir:
    """A finished run's folder as training and evaluation leave it: best = epoch 3 (step 120),
    last = epoch 4 (step 160), both exported, a grid per epoch, every checkpoint scored."""
    run = RunDir(root)
    csv = root.parent / f"{root.name}-captions.csv"
    if captions:
        pd.DataFrame({"id": range(len(CAPTIONS)), "image_path": [f"{i}.jpg" for i in range(len(CAPTIONS))],
                      "caption": [c for _, c in CAPTIONS], "split": [s for s, _ in CAPTIONS]}
                     ).to_csv(csv, index=False)
    cfg = Config()
    cfg.data.captions, cfg.output.dir = str(csv), str(root)
    cfg.output.export = ["kohya", "diffusers"]
    cfg.save(run.config)
    run.run_json.write_text(json.dumps({**RECORD, "random_init": random_init,
                                        "config": cfg.to_dict()}))
    pd.DataFrame({"epoch": [1, 2, 3, 4], "loss": [0.4, 0.3, 0.25, 0.21]}).to_csv(run.history, index=False)
    write_lora(run.epoch_checkpoint(3), 120, 3.0, random_init, seed=3)
    write_lora(run.best, 120, 3.0, random_init, seed=3)
    write_lora(run.epoch_checkpoint(4), 160, 4.0, random_init, seed=4)
    write_lora(run.last, 160, 4.0, random_init, seed=4)
    from fashion_sd.interop.lora_formats import export_lora

    for checkpoint in (run.best, run.last):
        for fmt, out in zip(("kohya", "diffusers"), run.exports(checkpoint, ("kohya", "diffusers"))):
            export_lora(checkpoint, fmt, out)
    for epoch in (3, 4):
        run.samples_at_epoch(epoch).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8 * epoch, 8), (epoch * 40, 0, 0)).save(run.samples_at_epoch(epoch))
    if scored:
        rng = np.random.default_rng(7)
        rows = [scores_row(REAL, None, rng), scores_row(BASE, None, rng),
                scores_row("epoch_003", 120, rng), scores_row("epoch_004", 160, rng)]
        if stale_best:  # an earlier `evaluate --checkpoints best`: a best that is no more,
            rows.append(scores_row("best", 80, rng))  # and another run's checkpoint of step 120
            rows.append(scores_row("epoch_009", 120, rng))
        rows[2]["selected"] = True
        rows[1]["notes"] = "CMMD off: no | pipes | please"
        run.eval.mkdir(parents=True)
        pd.DataFrame(rows, columns=COLUMNS).to_csv(run.scores, index=False, lineterminator="\n")
    return run


def scores_part(text: str) -> str:
    return text.split("## Scores", 1)[1].split("\n## ", 1)[0]


def parse_tables(part: str) -> list[dict]:
    """Each markdown table of the scores part as {label: [cells]}, with its header under ''."""
    tables, current = [], None
    for line in part.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if current is None:
            current = {"": cells[1:]}
            tables.append(current)
        elif not set(cells[0]) <= {"-", " "}:
            current[cells[0]] = cells[1:]
    return tables


# --------------------------------------------------------------------------------------------


def test_the_names_repeated_at_the_bottom_are_their_owners():
    from fashion_sd.interop.lora_formats import FORMATS

    assert model_card.PRETRAINED_ID == PRETRAINED_ID
    assert model_card.EXPORT_FORMATS == FORMATS
    assert (model_card.BASE_ROW, model_card.REAL_ROW) == (BASE, REAL)
    assert {column for _, column, _ in model_card.SCORE_ROWS} <= set(COLUMNS)


def test_card_names_sit_beside_their_lora(tmp_path):
    run = RunDir(tmp_path)
    assert run.card("best") == run.checkpoints / "best.README.md"
    assert rundir.card_path(tmp_path / "mine.safetensors") == tmp_path / "mine.README.md"
    assert rundir.card_image_path(run.card("last")) == run.checkpoints / "last.samples.png"


def test_the_hub_parses_the_card_and_round_trips_its_metadata(tmp_path):
    run = make_run(tmp_path / "demo")
    text = model_card.card(run, run.best, ("kohya", "diffusers"))
    hub = ModelCard(text)
    data = hub.data.to_dict()
    assert data["base_model"] == "CompVis/stable-diffusion-v1-4"
    assert data["license"] == "creativeml-openrail-m"
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert {"stable-diffusion", "lora", "text-to-image", "fashion", "diffusers"} <= set(data["tags"])
    assert data["instance_prompt"] == Config().captions.template
    assert ModelCardData(**data).to_dict() == data
    assert ModelCard(str(hub)).data.to_dict() == data and hub.text.startswith("\n# fashion-sd")
    # the widget: the first three distinct test-split captions, each with the grid beside the card
    tests = list(dict.fromkeys(c for s, c in CAPTIONS if s == "test"))[:3]
    assert [w["text"] for w in data["widget"]] == tests
    assert {w["output"]["url"] for w in data["widget"]} == {"best.samples.png"}
    assert "![sample grid of best](best.samples.png)" in text
    assert "`samples/epoch_003.png`" in text  # best is epoch 3's weights


def test_every_score_is_the_value_in_fid_csv(tmp_path):
    run = make_run(tmp_path / "demo", stale_best=True)
    csv = pd.read_csv(run.scores).set_index("checkpoint")
    (table,) = parse_tables(scores_part(model_card.card(run, run.best)))
    # best (step 120) is scored as epoch_003: not the stale row named best (step 80), not
    # another run's checkpoint of the same step
    assert table[""] == ["epoch_003 (this)", "base", "real"]
    models = ["epoch_003", "base", "real"]
    by_label = {label: (column, kind) for label, column, kind in model_card.SCORE_ROWS}
    shown = set()
    for label, cells in table.items():
        if not label:
            continue
        column, kind = by_label[label]
        shown.add(column)
        for model, cell in zip(models, cells):
            value = csv.loc[model, column]
            if pd.isna(value):
                assert cell == "", (label, model)
            elif kind == "num":
                assert math.isclose(float(cell), float(value), rel_tol=5e-4), (label, model)
            elif kind == "int":
                assert int(cell) == int(value), (label, model)
            else:
                assert cell == str(value), (label, model)
    assert {"fid", "kid_mean", "clip_score", "cmmd", "fd_dinov2", "type_top1", "on_model_rate",
            "n_real", "n_generated", "clip_model"} <= shown
    part = scores_part(model_card.card(run, run.best))
    assert "eval.select picked this checkpoint" in part and r"no \| pipes \| please" in part
    (last,) = parse_tables(scores_part(model_card.card(run, run.last)))
    assert last[""][0] == "epoch_004 (this)"
    assert float(last["FID (Inception; lower is better)"][0]) == pytest.approx(
        csv.loc["epoch_004", "fid"], rel=5e-4)


def test_training_data_and_run_figures_are_run_json_s(tmp_path):
    run = make_run(tmp_path / "demo")
    text = model_card.card(run, run.best)
    assert "**35 train**, **4 val** images" in text and "31 distinct captions" in text
    assert "train 0.8, val 0.1, test 0.1" in text
    assert "exclude masterCategory: Personal Care, Free Items, Home, Sporting Goods" in text
    assert "| best by | val_loss: 0.1235 |" in text and "| status | finished at step 160 (epoch 4) |" in text
    assert "| this checkpoint | `best` (epoch 3, step 120) |" in text
    assert "| options | snr_gamma: 5.0 |" in text and "| kind | LoRA |" in text
    assert "```yaml\n" + run.config.read_text().rstrip("\n") + "\n```" in text  # the config, folded
    assert "<details>" in text
    # how to load it, with the files beside the card
    assert 'pipe.load_lora_weights(".", weight_name="best.diffusers.safetensors")' in text
    assert "<lora:best.kohya:1>" in text and "models/Lora/" in text
    assert "fashion-sd generate --config ../config.yaml --lora best.lora.safetensors" in text


@pytest.mark.parametrize("record, meta", [(False, False), (True, False), (False, True), (True, True)])
def test_random_init_says_so_at_the_top_iff_it_is(tmp_path, record, meta):
    run = make_run(tmp_path / "r", random_init=record)
    if meta != record:
        write_lora(run.best, 120, 3.0, random_init=meta, seed=3)
    text = model_card.card(run, run.best)
    body = ModelCard(text).text
    warned = "**RANDOM-INIT" in body
    assert warned == (record or meta)
    if warned:
        assert body.index("**RANDOM-INIT") < body.index("## ")  # before every section
        assert "base_model" not in ModelCard(text).data.to_dict()


def test_missing_files_are_said_never_filled_in(tmp_path):
    run = make_run(tmp_path / "demo", scored=False, captions=False)
    run.run_json.unlink()
    text = model_card.card(run, run.best)
    assert "Not evaluated yet: the run has no `eval/fid.csv`" in text
    assert parse_tables(scores_part(text)) == []
    assert "rows: unknown (`run.json` is missing)" in text
    assert "run.json` is missing or unreadable" in text
    # no captions to read: the widget takes the run's own sample prompts, and says so
    widget = [w["text"] for w in ModelCard(text).data.to_dict()["widget"]]
    assert widget == list(Config().train.sample_prompts)[:3]
    assert "could not be read when this card was written" in text
    run.config.unlink()
    text = model_card.card(run, run.best)
    assert "`config.yaml` is missing or unreadable" in text and "widget" not in ModelCard(text).data.to_dict()
    # a checkpoint no evaluation scored
    run = make_run(tmp_path / "other")
    write_lora(run.last, 170, 4.25, seed=5)
    assert "has no row for this checkpoint (step 170)" in model_card.card(run, run.last)


def test_the_run_writer_writes_best_and_last_cards_and_evaluation_refreshes_them(tmp_path):
    from fashion_sd.training.writer import RunWriter

    run = make_run(tmp_path / "demo", scored=False)
    assert RunWriter(run, chief=False).write_cards() == []
    assert not run.card("best").exists()
    written = RunWriter(run).write_cards()
    assert written == [run.card("best"), run.card("last")]
    assert run.card("best").read_text() == model_card.card(run, run.best)
    for name, epoch in (("best", 3), ("last", 4)):  # each card's grid, copied beside it
        image = rundir.card_image_path(run.card(name))
        assert image.read_bytes() == run.samples_at_epoch(epoch).read_bytes()
    assert "Not evaluated yet" in run.card("best").read_text()
    scored = make_run(tmp_path / "scored")
    run.eval.mkdir()
    run.scores.write_bytes(scored.scores.read_bytes())
    assert model_card.refresh_cards(tmp_path / "elsewhere") == []  # an --out outside the run
    assert model_card.refresh_cards(run.eval) == written
    assert "eval.select picked this checkpoint" in run.card("best").read_text()


def test_a_card_that_cannot_be_written_never_fails_a_run_or_an_evaluation(tmp_path, monkeypatch, caplog):
    from fashion_sd.training.writer import RunWriter

    run = make_run(tmp_path / "demo")

    def broken(*args):
        raise KeyError("surprise")

    monkeypatch.setattr(model_card, "write_cards", broken)
    assert RunWriter(run).write_cards() == []
    assert model_card.refresh_cards(run.eval) == []  # nor an evaluation
    assert caplog.text.count("model cards of") == 2 and "surprise" in caplog.text


def test_export_lora_writes_a_card_beside_its_output(tmp_path):
    from fashion_sd.commands import convert

    run = make_run(tmp_path / "demo")
    out = tmp_path / "hub" / "fashion.safetensors"
    out.parent.mkdir()
    assert convert.main(["export-lora", "--lora", str(run.best), "--format", "diffusers",
                         "--out", str(out)]) == 0
    text = (tmp_path / "hub" / "fashion.README.md").read_text()
    assert 'pipe.load_lora_weights(".", weight_name="fashion.safetensors")' in text
    assert (tmp_path / "hub" / "fashion.samples.png").read_bytes() == run.samples_at_epoch(3).read_bytes()
    assert "--lora ../demo/checkpoints/best.lora.safetensors" in text
    assert parse_tables(scores_part(text))[0][""][0] == "epoch_003 (this)"
    assert "no kohya export beside this card" in text
    # a LoRA outside any run folder: its metadata alone
    alone = write_lora(tmp_path / "alone.lora.safetensors", 7, 0.25)
    card = model_card.write_export_card(alone, "kohya", tmp_path / "alone.kohya.safetensors")
    text = card.read_text()
    hub = ModelCard(text)
    assert hub.data.to_dict()["base_model"] == "CompVis/stable-diffusion-v1-4"
    assert "widget" not in hub.data.to_dict() and "## Scores" not in text
    assert "No run folder was found beside this LoRA" in text
    assert "| rank / alpha | 2 / 4.0 |" in text and "| this checkpoint | `alone` (epoch 0.25, step 7) |" in text
    # an imported LoRA is not called trained here, and names no base it cannot know
    tensors, meta = lora_file.read(alone)
    meta = {k: v for k, v in meta.items() if k not in ("base_weights", "caption_template", "format",
                                                         "format_version", "lora_init")}
    imported = lora_file.write(tmp_path / "civitai.lora.safetensors", tensors, {
        **meta, "imported_from": "style.safetensors", "imported_format": "kohya",
        "imported_sha256": "ab" * 32})
    hub = ModelCard(model_card.card(None, imported, {}))
    assert "imported into fashion-sd from a kohya file, `style.safetensors`" in hub.text
    assert "trained with fashion-sd" not in hub.text and "base_model" not in hub.data.to_dict()
