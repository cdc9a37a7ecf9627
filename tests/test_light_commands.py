"""Light work stays light: importing every command, each command's checks on a bad flag and
every ``--help`` load neither Keras nor TensorFlow (a bad flag costs a fraction of a second, not
TensorFlow's import). Each case runs in a fresh interpreter, as a user's command does."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

PROBE = """
import json, sys
from fashion_sd import cli
try:
    rc = cli.main(sys.argv[1:])
except SystemExit as exit:
    rc = exit.code
print(json.dumps({"rc": rc, "heavy": sorted({"keras", "tensorflow"} & set(sys.modules))}))
"""
BAD_FLAGS = {
    "captions": ["--styles", "{t}/nope.csv", "--out", "{t}/c.csv"],
    "train": ["--config", "{t}/nope.yaml"],
    "generate": ["--config", "configs/demo.yaml", "--prompt", "a shirt", "--lora",
                 "{t}/nope.lora.safetensors", "--out", "{t}/g"],
    "evaluate": ["--config", "configs/demo.yaml", "--checkpoints", "{t}/nope"],
    "sweep": ["--config", "{t}/nope.yaml"],
    "convert": ["import-lora", "--from", "{t}/nope.safetensors", "--out", "{t}/x.lora.safetensors"],
    "app": ["--config", "configs/demo.yaml", "--port", "0"],
    "workers": ["0"],
}


def _run(args, tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE, *[a.format(t=tmp_path) for a in args]],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.mark.parametrize("command", sorted(BAD_FLAGS))
def test_a_bad_flag_is_refused_without_keras_or_tensorflow(command, tmp_path):
    result, err = _run([command, *BAD_FLAGS[command]], tmp_path)
    assert result["rc"] == 2 and "error:" in err and "Traceback" not in err
    assert result["heavy"] == [], f"{command} loaded {result['heavy']} to refuse a bad flag"


@pytest.mark.parametrize("command", sorted(BAD_FLAGS))
def test_help_loads_neither(command, tmp_path):
    result, _ = _run([command, "--help"], tmp_path)
    assert result == {"rc": 0, "heavy": []}


def test_importing_every_command_loads_neither():
    from fashion_sd.cli import COMMANDS

    code = ("import importlib, sys\n"
            f"for m in {sorted(m for m, _ in COMMANDS.values())!r}:\n"
            "    importlib.import_module('fashion_sd.commands.' + m)\n"
            "print(sorted({'keras', 'tensorflow'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.strip() == "[]", out.stderr


# A run's input checks need no model: the train command answers them before Keras loads.
BAD_RUNS = {
    "a lora.targets typo": (["--set", "lora.targets=[to_qq]"], "'to_qq' match no attention"),
    "grad_accum past the run": (["--set", "train.grad_accum=4096"], "fewer than one optimizer"),
    "missing weights folder": (["--set", "model.weights=local:{t}/none"], "folder not found"),
    "nothing to resume": (["--resume"], "nothing to resume"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_a_run_s_bad_input_is_refused_before_keras_loads(case, tmp_path, demo_captions):
    extra, message = BAD_RUNS[case]
    out = tmp_path / "run"
    if "--resume" in extra:  # a run folder with a config and no train state
        out.mkdir()
        (out / "config.yaml").write_text((ROOT / "configs/demo.yaml").read_text().replace(
            "runs/demo/captions.csv", str(demo_captions)).replace("runs/demo", str(out)))
    result, err = _run(["train", "--config", "configs/demo.yaml", "--set", f"output.dir={out}",
                        "--set", f"data.captions={demo_captions}", *extra], tmp_path)
    assert result["rc"] == 2 and message in err and "Traceback" not in err, err
    assert result["heavy"] == [], f"train loaded {result['heavy']} to refuse {case}"
