"""The run folder's one owner: names, listing, reading; and the LoRA section's metadata."""

import json

import pandas as pd

from fashion_sd import rundir
from fashion_sd.config import LoraConfig
from fashion_sd.rundir import RunDir


def test_names_and_paths(tmp_path):
    run = RunDir(tmp_path)
    assert run.checkpoint("best") == run.best == tmp_path / "checkpoints" / "best.lora.safetensors"
    assert run.epoch_checkpoint(3) == tmp_path / "checkpoints" / "epoch_003.lora.safetensors"
    assert run.train_state.parent == run.checkpoints and run.scores.parent == run.eval
    assert run.samples_at_epoch(2).name == "epoch_002.png"
    assert run.samples_at_step(12).name == "step_000012.png"
    for name in ("best", "epoch_007", "last"):
        assert rundir.checkpoint_name(run.checkpoint(name)) == name
    assert rundir.checkpoint_name("x/best.kohya.safetensors") == "best.kohya"
    assert rundir.export_path(run.best, "kohya") == run.checkpoints / "best.kohya.safetensors"
    assert rundir.export_path(tmp_path / "mine.safetensors", "diffusers").name == "mine.diffusers.safetensors"
    assert not rundir.is_lora_file(run.train_state) and rundir.is_lora_file(run.best)


def test_listing_and_reading(tmp_path):
    run = RunDir(tmp_path)
    assert run.scored_checkpoints() == [] and run.status() is None
    assert run.read_history() is None and run.read_scores() is None
    run.checkpoints.mkdir()
    run.last.write_bytes(b"x")
    assert run.scored_checkpoints() == [run.last]  # no epoch checkpoints: the last one
    for e in (2, 1):
        run.epoch_checkpoint(e).write_bytes(b"x")
    run.train_state.write_bytes(b"x")
    run.best.with_name("best.kohya.safetensors").write_bytes(b"x")  # an export: no checkpoint
    assert run.scored_checkpoints() == [run.epoch_checkpoint(1), run.epoch_checkpoint(2)]
    assert [rundir.checkpoint_name(p) for p in run.all_checkpoints()] == ["epoch_001", "epoch_002", "last"]
    run.run_json.write_text(json.dumps({"status": "finished"}))
    assert run.status() == "finished"
    run.run_json.write_text("{broken")
    assert run.status() is None
    pd.DataFrame({"epoch": [1], "loss": [0.5]}).to_csv(run.history, index=False)
    assert run.read_history().loss.tolist() == [0.5]
    run.history.write_text('a,b\n1,"2\n')  # unreadable: treated as absent, never a crash
    assert run.read_history() is None


def test_lora_section_metadata_round_trip():
    spec = LoraConfig(rank=8, alpha=16.0, targets=["attn2.to_k", "to_v"])
    meta = spec.to_meta()
    assert all(isinstance(v, str) for v in meta.values())  # safetensors metadata are strings
    back = LoraConfig.from_meta(meta)
    assert (back.rank, back.alpha, back.targets) == (8, 16.0, ["attn2.to_k", "to_v"])
