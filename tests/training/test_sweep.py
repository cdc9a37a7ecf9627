"""Sweeps: the file, run names, results from what runs leave behind, failures, the paper table."""

import json

import pandas as pd
import pytest
from conftest import ROOT

from fashion_sd import paper
from fashion_sd.training import tuning
from fashion_sd.training import sweep as sw


def write(tmp_path, text, name="s.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_sweeps_load():
    s = sw.load_sweep(ROOT / "configs/sweep_paper.yaml")
    triples = [(r["lora.rank"], r["train.learning_rate"], r["train.batch_size"]) for r in s.runs]
    assert sorted(triples) == sorted(paper.paper_runs())  # every distinct run of Figs 4, 7-9
    assert len(set(sw.run_name(r) for r in s.runs)) == 12
    demo = sw.load_sweep(ROOT / "configs/sweep_demo.yaml")
    assert [sw.run_name(r) for r in demo.runs] == ["r2", "r4"]
    assert sw.config_for(demo, demo.runs[0]).train.max_steps == 2
    longer = sw.load_sweep(ROOT / "configs/sweep_demo.yaml", ["train.max_steps=5"])
    assert sw.config_for(longer, longer.runs[1]).train.max_steps == 5
    with pytest.raises(sw.SweepError, match="(?s)run r2.*'lora.alpha' must be > 0"):
        sw.load_sweep(ROOT / "configs/sweep_demo.yaml", ["lora.alpha=0"])


def test_quality_sweep_is_one_ablation_per_option_against_the_baseline():
    s = sw.load_sweep(ROOT / "configs/sweep_quality.yaml")
    assert [sw.run_name(r) for r in s.runs][0] == "base"
    def options(cfg):
        t = cfg.train
        return {"snr_gamma": t.snr_gamma, "noise_offset": t.noise_offset,
                "caption_dropout": t.caption_dropout, "ema_decay": t.ema_decay,
                "text_encoder": cfg.lora.text_encoder}

    base = options(sw.config_for(s, s.runs[0]))
    changed = []
    for r in s.runs[1:]:
        got = options(sw.config_for(s, r))
        diff = [k for k in got if got[k] != base[k]]
        assert len(diff) == 1  # one option per run, the rest as the baseline
        changed += diff
    assert sorted(changed) == sorted(base)


def test_run_names():
    assert sw.run_name({"lora.rank": 4, "train.learning_rate": 5e-5, "train.batch_size": 3}) == \
        "r4_lr5e-05_bs3"
    assert sw.run_name({"lora.targets": ["to_q", "to_v"]}) == "tto_q-to_v"
    assert sw.run_name({"data.flip": False}) == "flipFalse"


def test_grid_expands(tmp_path):
    p = write(tmp_path, f"base: {ROOT / 'configs/demo.yaml'}\ngrid:\n  lora.rank: [2, 4]\n"
                        "  train.batch_size: [1, 2]\n")
    assert [sw.run_name(r) for r in sw.load_sweep(p).runs] == ["r2_bs1", "r2_bs2", "r4_bs1", "r4_bs2"]


@pytest.mark.parametrize("text, expected", [
    ("grid: {lora.rank: [2]}\n", "'base'"),
    ("base: demo.yaml\n", "no runs"),
    ("base: demo.yaml\nruns: [{lora.rnak: 2}]\n", "run rnak2.*did you mean 'lora.rank'"),
    ("base: demo.yaml\nruns: [{lora.rank: 0}]\n", "run r0.*'lora.rank' must be > 0"),
    ("base: demo.yaml\nruns: [{lora.rank: 2}, {lora.rank: 2}]\n", "runs repeat: r2"),
    ("base: demo.yaml\nrun: []\n", "unknown key"),
    ("base: demo.yaml\nruns: [{lora.rank: 2}]\nsearch: {lora.rank: [2]}\n", "search.lora.rank"),
    ("base: demo.yaml\nruns: [{lora.rank: 2}]\nobjective: fid\n", "objective"),
])
def test_bad_sweep_files(tmp_path, text, expected):
    (tmp_path / "demo.yaml").write_text((ROOT / "configs/demo.yaml").read_text())
    with pytest.raises(sw.SweepError, match="(?s)" + expected):
        sw.load_sweep(write(tmp_path, text))


def fake_run(out, name, losses, fids, kids, status="finished", trainable=1000, cmmds=None):
    d = out / name
    (d / "eval").mkdir(parents=True)
    pd.DataFrame({"epoch": range(1, len(losses) + 1), "step": range(1, len(losses) + 1),
                  "loss": losses, "val_loss": [x + 0.1 for x in losses], "lr": 1e-4,
                  "skipped_steps": 0, "seconds": [10.0 * (i + 1) for i in range(len(losses))]}
                 ).to_csv(d / "history.csv", index=False)
    (d / "run.json").write_text(json.dumps({"status": status, "trainable_parameters": trainable,
                                            "weights": {"id": "random-init(seed=42)"}}))
    pd.DataFrame({"checkpoint": ["base"] + [f"epoch_{i:03d}" for i in range(1, len(fids) + 1)],
                  "epoch": [float("nan")] + list(range(1, len(fids) + 1)),
                  "fid": [999.0] + fids, "kid_mean": [9.0] + kids, "kid_std": 0.1,
                  "n_real": 4, "n_generated": 4, "comparable": False,
                  **({"cmmd": [9.0] + cmmds} if cmmds else {})}).to_csv(d / "eval/fid.csv", index=False)


def test_results_table_and_figures(tmp_path):
    s = sw.Sweep(tmp_path / "s.yaml", ROOT / "configs/demo.yaml", tmp_path / "out",
                 runs=[{"lora.rank": 2}, {"lora.rank": 4}, {"lora.rank": 8}])
    fake_run(s.output, "r2", [1.0, 0.8], [50.0, 40.0], [0.5, 0.3], cmmds=[0.25, 0.5])
    fake_run(s.output, "r4", [1.0, 0.7], [45.0, 42.0], [0.2, 0.4])
    rows = [sw.row_for(s, r) for r in s.runs[:2]]
    rows.append(sw.row_for(s, s.runs[2], {"status": "failed", "error": "error: out of memory"}))
    df = sw.write_results(rows, s.output, "label")
    assert df.run.tolist() == ["r2", "r4", "r8"]
    assert df.best_fid.tolist()[:2] == [40.0, 42.0] and df.best_fid_epoch.tolist()[:2] == [2, 2]
    assert df.best_kid.tolist()[:2] == [0.3, 0.2] and df.best_kid_epoch.tolist()[:2] == [2, 1]
    assert df.final_val_loss.tolist()[:2] == pytest.approx([0.9, 0.8])
    # CMMD where the run's evaluation had it (its base row is never the best), empty elsewhere
    assert (df.best_cmmd[0], df.best_cmmd_epoch[0]) == (0.25, 1) and df.best_cmmd[1:].isna().all()
    assert df.best.tolist() == [True, False, False] and df.status.tolist()[2] == "failed"
    assert df.trainable_parameters.tolist()[:2] == [1000, 1000]
    md = (s.output / "results.md").read_text()
    assert md.count("**best**") == 1 and "r8 failed: error: out of memory" in md
    assert "| 0.25 (1) / - |" in md and "| - / - |" in md
    assert "NOT COMPARABLE" in md
    assert pd.read_csv(s.output / "results.csv").run.tolist() == ["r2", "r4", "r8"]
    assert (s.output / "fid_by_rank.png").stat().st_size > 1000
    assert (s.output / "loss_curves.png").stat().st_size > 1000


def test_paper_fid_lookup():
    assert paper.reported_fid(4, 1e-6, 3) == "325.4 (Fig 7) | 370.4 (Fig 9)"
    assert paper.reported_fid(4, 5e-5, 1) == "542.6 (Fig 8)"
    assert paper.reported_fid(2, 5e-5, 3) == ""
    s = sw.Sweep(ROOT / "s.yaml", ROOT / "configs/paper_best.yaml", ROOT / "runs/none",
                 runs=[{"lora.rank": 4, "train.learning_rate": 1e-4}])
    assert sw.row_for(s, s.runs[0])["paper_fid"] == "391 (Fig 9)"


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path, demo_captions):
    p = write(tmp_path, f"base: {ROOT / 'configs/demo.yaml'}\noutput: {tmp_path / 'out'}\n"
                        f"set: [data.cache_dir={tmp_path / 'cache'}]\nevaluate: false\nruns:\n"
                        f"  - {{data.captions: {tmp_path / 'missing.csv'}}}\n"
                        f"  - {{data.captions: {tmp_path / 'missing2.csv'}}}\n")
    s = sw.load_sweep(p)
    df = sw.run_sweep(s)
    assert df.status.tolist() == ["failed", "failed"]
    assert "captions file not found" in df.error.iloc[0]
    assert (tmp_path / "out" / sw.run_name(s.runs[0]) / "sweep.log").is_file()


def test_tuner_searches_the_space_through_ordinary_runs(tmp_path, monkeypatch):
    """KerasTuner drives the runs (training is faked here; the demo sweep test trains for real)."""
    s = sw.Sweep(tmp_path / "s.yaml", ROOT / "configs/demo.yaml", tmp_path / "out",
                 search={"lora.rank": {"choices": [2, 4, 8]},
                         "train.learning_rate": {"min": 1e-5, "max": 1e-3, "log": True}},
                 objective="val_loss")
    seen = []

    def fake_execute(sweep, run):
        name = sw.run_name(run)
        seen.append(run)
        if not (sweep.output / name).exists():
            loss = run["lora.rank"] * 0.1 + run["train.learning_rate"]
            fake_run(sweep.output, name, [loss + 0.2, loss], [10.0 - loss], [0.1])  # FID disagrees
        return {"run": name, "status": "finished", "error": ""}

    monkeypatch.setattr(sw, "execute", fake_execute)
    df = tuning.tune(s, "random", max_trials=3)
    assert len(seen) == 3 and len(df) == 3
    assert all(r["lora.rank"] in (2, 4, 8) and 1e-5 <= r["train.learning_rate"] <= 1e-3 for r in seen)
    assert df.trial.tolist() == ["random 0", "random 1", "random 2"]
    assert df.loc[df.best, "final_val_loss"].item() == df.final_val_loss.min()
    assert (s.output / "results.md").is_file()


def test_finished_runs_are_skipped(tmp_path, monkeypatch):
    s = sw.Sweep(tmp_path / "s.yaml", ROOT / "configs/demo.yaml", tmp_path / "out",
                 runs=[{"lora.rank": 2}], evaluate=False)
    fake_run(s.output, "r2", [1.0], [5.0], [0.1], status="finished")
    monkeypatch.setattr(sw, "_call", lambda *a, **k: pytest.fail("a finished run was retrained"))
    assert sw.execute(s, {"lora.rank": 2})["status"] == "finished"
    calls = []
    monkeypatch.setattr(sw, "_call", lambda args, folder, name: calls.append(args) or 0)
    fake_run(s.output, "r4", [1.0], [5.0], [0.1], status="stopped")
    (s.output / "r4/checkpoints").mkdir()
    (s.output / "r4/checkpoints/train_state.safetensors").write_bytes(b"x")
    sw.execute(s, {"lora.rank": 4})
    assert calls and calls[0][-1] == "--resume"  # an interrupted run continues
