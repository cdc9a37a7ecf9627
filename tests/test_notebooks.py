"""Every notebook, executed top to bottom in demo mode with papermill, as a user would run it.

01 trains and scores a tiny demo run, 02 generates with its LoRA, 03 runs the demo sweep
(`configs/sweep_demo.yaml`, one run of its grid, trained and tabled). Marked slow: minutes on 2
cores.
"""

import json

import pandas as pd
import pytest
import yaml
from conftest import ROOT

pytestmark = pytest.mark.slow


def execute(name, tmp_path, **parameters):
    import papermill

    out = tmp_path / f"out_{name}"
    papermill.execute_notebook(str(ROOT / "notebooks" / name), str(out), parameters=parameters,
                               cwd=str(ROOT), kernel_name="python3", progress_bar=False,
                               log_output=False)
    return json.loads(out.read_text())


def test_notebooks_are_committed_without_outputs():
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        assert any("parameters" in c["metadata"].get("tags", []) for c in cells), nb.name
        assert all(not c.get("outputs") and not c.get("execution_count")
                   for c in cells if c["cell_type"] == "code"), f"{nb.name} has outputs"


def test_notebooks_run_in_demo_mode(tmp_path):
    run = tmp_path / "run"
    sets = [f"data.captions={tmp_path / 'captions.csv'}", f"data.cache_dir={tmp_path / 'cache'}",
            f"output.dir={run}", "train.max_steps=2", "train.sample_steps=2",
            "eval.num_images=2", "eval.steps=2"]
    nb = execute("01_train_and_evaluate.ipynb", tmp_path, DEMO=True, EXTRA=sets)
    assert nb["metadata"]["papermill"]["exception"] is None
    assert (run / "checkpoints/last.lora.safetensors").is_file()
    assert (run / "eval/fid.csv").is_file()
    shown = [o for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(shown) >= 4  # loss curve, samples, FID plot, real vs generated

    gen = tmp_path / "gen"
    nb = execute("02_generate.ipynb", tmp_path, DEMO=True,
                 LORA=str(run / "checkpoints/last.lora.safetensors"), OUT=str(gen), NUM_IMAGES=1,
                 STEPS=2, EXTRA=sets[:3], APP_RUN=str(run))
    side = json.loads((gen / "generate.json").read_text())
    assert side["lora"].endswith("last.lora.safetensors") and len(side["prompts"]) == 3
    printed = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "assistant at http://127.0.0.1:" in printed and "'last'" in printed  # the app opened

    sweep = yaml.safe_load((ROOT / "configs/sweep_demo.yaml").read_text())
    sweep["base"] = str(ROOT / "configs" / sweep["base"])
    sweep["output"] = str(tmp_path / "sweep")
    sweep["set"] += sets[:2]
    # One run of the grid's two, trained but not scored: the notebook's cells are the same for
    # any number of runs and with or without FID, the sweep itself (every run, the best picked)
    # is tested on tiny models, and its evaluation child at real size by tests/test_cli.py;
    # each real-size process costs minutes (it builds the networks).
    sweep["grid"] = {"lora.rank": [2]}
    sweep["evaluate"] = False
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    nb = execute("03_sweep.ipynb", tmp_path, DEMO=True, SWEEP=str(tmp_path / "sweep.yaml"))
    results = pd.read_csv(tmp_path / "sweep" / "results.csv")
    assert results.run.tolist() == ["r2"] and (results.status == "finished").all()
    assert results.final_val_loss.notna().all() and results.best.sum() == 1  # picked by val loss
    assert (tmp_path / "sweep" / "loss_curves.png").is_file()  # (FID by rank needs two ranks)
    shown = [o for c in nb["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(shown) == 1  # the loss curves, under the results table
