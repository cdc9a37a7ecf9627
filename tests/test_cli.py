"""One entry point: ``fashion-sd COMMAND`` / ``python -m fashion_sd COMMAND``, and the sweep run
from a non-editable install (children started through the entry point, not by script path) on
the real-size networks loaded from a weights folder (``model.weights: local:DIR``)."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT

from fashion_sd import cli


def run_module(*args, cwd=ROOT, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "fashion_sd", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_every_command_is_listed_and_reachable():
    out = run_module("--help")
    assert out.returncode == 0
    for name in ("captions", "train", "generate", "evaluate", "sweep", "convert", "app"):
        assert f"  {name} " in out.stdout
    bad = run_module("trian")
    assert bad.returncode == 2 and "unknown command 'trian'" in bad.stderr
    assert run_module().returncode == 2
    # each command's own options come from the same main() the scripts call
    train = run_module("train", "--help")
    assert train.returncode == 0 and "--resume" in train.stdout
    assert "--include-base" in run_module("evaluate", "--help").stdout


def test_scripts_and_the_entry_point_share_one_main():
    import importlib.util

    for script, command in (("train", "train"), ("evaluate_fid", "evaluate"),
                            ("build_captions", "captions")):
        spec = importlib.util.spec_from_file_location(f"s_{script}", ROOT / f"scripts/{script}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        target = __import__(f"fashion_sd.commands.{command}", fromlist=["main"])
        assert mod.main is target.main
        assert cli.COMMANDS[command][0] == command


SAVE_RANDOM_WEIGHTS = """
import sys, keras
from fashion_sd.sd import models
keras.utils.set_random_seed(7)
source = models.WeightsSource("random", "random", id="random-init(seed=7)")
models.save_components(models.build_components(source, 64), sys.argv[1])
"""


@pytest.mark.slow
def test_sweep_runs_from_a_non_editable_install(tmp_path, demo_captions):
    # `pip install .` into a fresh venv, then the console script: a sweep that ran scripts/ by
    # path, or found the package through the checkout, fails here. The venv borrows the test
    # environment's dependencies through a .pth path line (not their .pth hooks, so the
    # checkout's editable install stays out) instead of downloading them again.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_dir = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    (Path(site_dir) / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    "--no-deps", "--no-build-isolation", str(ROOT)], check=True,
                   capture_output=True, timeout=300)
    entry = venv / "bin" / "fashion-sd"
    assert entry.is_file() and (Path(site_dir) / "fashion_sd" / "cli.py").is_file()
    # The run loads its networks from a weights folder (model.weights: local:DIR), saved from
    # a random init in a process of its own so that this one stays small.
    weights = tmp_path / "weights"
    subprocess.run([sys.executable, "-c", SAVE_RANDOM_WEIGHTS, str(weights)], check=True,
                   timeout=600)
    sweep = yaml.safe_load((ROOT / "configs/sweep_demo.yaml").read_text())
    sweep.update(base=str(ROOT / "configs" / sweep["base"]), output=str(tmp_path / "sweep"))
    sweep["set"] += [f"data.captions={demo_captions}", f"data.cache_dir={tmp_path / 'cache'}",
                     "train.max_steps=1", f"model.weights=local:{weights}"]
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    work = tmp_path / "elsewhere"  # not the checkout: nothing found through the working folder
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import fashion_sd; print(fashion_sd.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(site_dir)  # the installed copy, not the checkout
    out = subprocess.run([str(entry), "sweep", "--config", str(tmp_path / "sweep.yaml"),
                          "--only", "r2"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=1200)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    log = (tmp_path / "sweep" / "r2" / "sweep.log").read_text()
    assert "-m fashion_sd train" in log and "-m fashion_sd evaluate" in log
    assert str(python) in log  # children run on the venv's interpreter
    results = pd.read_csv(tmp_path / "sweep" / "results.csv")
    assert results.set_index("run").loc["r2", "status"] == "finished"
    record = json.loads((tmp_path / "sweep" / "r2" / "run.json").read_text())
    assert record["random_init"] is False and record["weights"]["kind"] == "local"
    assert record["weights"]["id"].startswith("local:")
    lora = tmp_path / "sweep" / "r2" / "checkpoints" / "last.lora.safetensors"
    assert lora.stat().st_size > 1.59e6  # rank 2 on the real U-Net: 398,592 float32 numbers


def test_the_local_workers_launcher_checks_its_arguments(capsys):
    from fashion_sd.commands import workers

    assert workers.main(["1", "--", "--config", "configs/demo.yaml"]) == 2
    assert "give 2 or more" in capsys.readouterr().err
    assert workers.main(["2"]) == 2
    assert "give the train arguments after --" in capsys.readouterr().err
    spec = json.loads(workers.tf_config([1111, 2222], 1))
    assert spec == {"cluster": {"worker": ["localhost:1111", "localhost:2222"]},
                    "task": {"type": "worker", "index": 1}}
