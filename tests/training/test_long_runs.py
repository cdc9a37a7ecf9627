"""Long runs lose nothing: a SIGTERM mid-epoch saves the step and resumes bit-exact, step
checkpoints are listed by evaluation and the app, one run per folder, and a full disk stops a
run with its last files intact. Tiny U-Net, KerasCV's real encoders (as tests/training/test_run.py)."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from safetensors.numpy import load_file
from test_run import build, config, train  # noqa: F401 - build is a fixture

from fashion_sd import files, runlock
from fashion_sd.rundir import RunDir
from fashion_sd.sd import lora_file
from fashion_sd.training import callbacks, run, writer
from fashion_sd.training.shards import CacheSpaceError


def _weights(folder):
    return load_file(str(folder / "checkpoints/last.lora.safetensors"))


def test_sigterm_mid_epoch_saves_the_step_and_resumes_bit_exact(tmp_path, demo_captions,
                                                               encoder_cache, build, monkeypatch,
                                                               capsys):
    """8 steps an epoch; SIGTERM during step 3: the step finishes, the train state of step 3 is
    written, the run exits with 143 and says how to resume; resumed, it ends with the weights of
    an uninterrupted run."""
    train(config(tmp_path, demo_captions, encoder_cache, name="straight"), build)
    guard = callbacks.StepGuard.on_train_batch_end

    def signal_during_step_3(self, batch, logs=None):
        if self.state.step == 2:  # the third step has just run: the signal arrives now
            os.kill(os.getpid(), signal.SIGTERM)
        return guard(self, batch, logs)

    monkeypatch.setattr(callbacks.StepGuard, "on_train_batch_end", signal_during_step_3)
    cfg = config(tmp_path, demo_captions, encoder_cache, name="stopped")
    with pytest.raises(run.TrainingInterrupted) as info:
        train(cfg, build)
    assert info.value.exit_code == 143 and "SIGTERM at step 3" in str(info.value)
    assert "--resume" in str(info.value)
    out = tmp_path / "stopped"
    assert run.load_train_state_step(out / "checkpoints/train_state.safetensors") == 3
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers put back
    monkeypatch.undo()
    resumed = train(cfg, build, resume=True)
    assert resumed["status"] == "finished" and resumed["step"] == 16
    a, b = _weights(tmp_path / "straight"), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_the_train_state_every_n_steps_and_step_checkpoints_are_listed(
        tmp_path, demo_captions, encoder_cache, build, monkeypatch):
    """save_every_steps=3: a run cut at step 7 resumes from step 6. checkpoint_every_steps=2:
    step checkpoints (the last keep_last kept) that evaluate and the app list."""
    from fashion_sd.evaluation import evaluate
    from fashion_sd.serving import assistant

    saved = []
    real = writer.save_train_state
    monkeypatch.setattr(writer, "save_train_state",
                        lambda path, model, layers, info: saved.append(info["step"])
                        or real(path, model, layers, info))
    cfg = config(tmp_path, demo_captions, encoder_cache, "train.save_every_steps=3",
                 "train.checkpoint_every_steps=2", "train.keep_last=2")
    train(cfg, build)
    assert saved == [3, 6, 8, 9, 12, 15, 16]  # every 3 steps, and at each epoch end
    folder = RunDir(tmp_path / "run")
    steps = [p.name for p in folder.step_checkpoints()]
    assert steps == ["step_000012.lora.safetensors", "step_000014.lora.safetensors"]
    listed = [p.name for p in evaluate.find_checkpoints(folder.checkpoints)]
    assert set(steps) <= set(listed) and "epoch_002.lora.safetensors" in listed
    in_app = {c.name: c for c in assistant.list_checkpoints(folder.root)}
    assert in_app["step_000014"].step == 14 and in_app["step_000014"].epoch == 1.75


def test_a_second_run_in_a_live_runs_folder_is_refused_before_any_model(
        tmp_path, demo_captions, encoder_cache):
    cfg = config(tmp_path, demo_captions, encoder_cache)
    folder = RunDir(cfg.output.dir)
    with runlock.RunLock(folder.lock_file, folder.root):
        def never(*a):
            pytest.fail("a model was built")

        with pytest.raises(runlock.RunFolderBusy, match=f"process {os.getpid()}") as info:
            run.train(cfg, progress=None, verbose=0, build=never)
        assert str(folder.root) in str(info.value)
        assert not folder.config.exists()  # the live run's config is not replaced


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    folder = RunDir(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fashion_sd.runlock import RunLock; "
         f"RunLock({str(folder.lock_file)!r}, 'run').acquire(); print('held', flush=True); "
         "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # an event, not a guess of speed
        with pytest.raises(runlock.RunFolderBusy, match=f"process {holder.pid}"):
            runlock.RunLock(folder.lock_file, folder.root).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=120)
    with runlock.RunLock(folder.lock_file, folder.root):
        assert f"lock of process {holder.pid}" in caplog.text and "no longer running" in caplog.text
        assert json.loads(folder.lock_file.read_text())["pid"] == os.getpid()
    caplog.clear()
    with runlock.RunLock(folder.lock_file, folder.root):  # released cleanly: no warning
        pass
    assert "taking over" not in caplog.text


def test_a_full_disk_stops_the_run_with_its_last_files_intact(tmp_path, demo_captions,
                                                              encoder_cache, build, monkeypatch):
    """The second epoch's first write fails for space: the run stops with exit-1 error naming
    the file and the room needed; the first epoch's checkpoint and train state are intact, no
    temporary file is left, and --resume continues once there is room."""
    import safetensors.numpy


    real = safetensors.numpy.save_file
    calls = []

    def full_after_epoch_1(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 5:  # epoch 1: epoch_001, best, last, train state; then epoch_002
            raise OSError(28, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    from fashion_sd.training import trainer

    for module in (safetensors.numpy, lora_file, trainer):  # every writer's save_file
        monkeypatch.setattr(module, "save_file", full_after_epoch_1, raising=False)
    cfg = config(tmp_path, demo_captions, encoder_cache, "train.save_every_steps=0")
    with pytest.raises(run.TrainingStopped) as info:
        train(cfg, build)
    message = str(info.value)
    assert "no space left on the device writing" in message and "epoch_002" in message
    assert "needs about" in message and "step 8" in message and "intact" in message
    ck = tmp_path / "run/checkpoints"
    assert not list(ck.glob(".*.tmp")) and not (ck / "epoch_002.lora.safetensors").exists()
    assert lora_file.read(ck / "last.lora.safetensors")[1]["step"] == "8"
    monkeypatch.undo()
    assert train(cfg, build, resume=True)["step"] == 16


def test_atomic_writes_name_a_full_disk_and_keep_the_old_file(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    with pytest.raises(files.DiskFull, match="table.csv.*free in") as info:
        with files.atomic_path(target) as tmp:
            tmp.write_text("x" * 10)
            raise OSError(28, "No space left on device")
    assert target.read_text() == "old" and info.value.needed >= 10
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_the_cache_checks_free_space_before_encoding(tmp_path, monkeypatch):
    import shutil

    from fashion_sd.training import shards

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shards.shutil, "disk_usage",
                        lambda p: usage._replace(free=1000))
    computed = []
    with pytest.raises(CacheSpaceError, match=r"images cache needs about 6\.6 KB.*1000 B free"):
        shards.sharded(tmp_path, {"kind": "images"}, 100, lambda a, b: computed.append(a),
                       "float16", row_shape=(4, 8))
    assert computed == []  # refused before encoding anything


def test_the_train_command_exits_with_the_signals_code(monkeypatch, capsys, tmp_path,
                                                       demo_captions):
    from fashion_sd.commands import train as command

    def interrupted(cfg, **kw):
        raise run.TrainingInterrupted("SIGINT at step 3 (epoch 0.375): stopped cleanly. ...; "
                                      "continue with: fashion-sd train --config X --resume", 130)

    monkeypatch.setattr(run, "train", interrupted)
    # inputs that pass the checks made before Keras loads (a fresh clone has no runs/demo)
    assert command.main(["--config", str(ROOT / "configs/demo.yaml"), "--set",
                         f"data.captions={demo_captions}", "--set",
                         f"output.dir={tmp_path / 'run'}"]) == 130
    assert "continue with: fashion-sd train" in capsys.readouterr().err


def test_a_crash_before_the_epochs_train_state_keeps_its_history_row(tmp_path, demo_captions,
                                                                      encoder_cache, build,
                                                                      monkeypatch):
    """The train state is written last at an epoch's end: a crash just before it resumes from
    the previous epoch and writes the row again. Written first, a crash after it left a
    finished run whose history.csv had lost the epoch's row."""
    import pandas as pd

    cfg = config(tmp_path, demo_captions, encoder_cache)  # 2 epochs of 8 steps
    real = writer.save_train_state

    def power_cut_at_step_16(path, model, layers, info):
        if info["optimizer_step"] == 16:
            raise OSError("power cut")
        return real(path, model, layers, info)

    monkeypatch.setattr(writer, "save_train_state", power_cut_at_step_16)
    with pytest.raises(OSError, match="power cut"):
        train(cfg, build)
    monkeypatch.undo()
    summary = train(cfg, build, resume=True)
    assert summary["status"] == "finished" and summary["step"] == 16
    assert pd.read_csv(tmp_path / "run" / "history.csv").step.tolist() == [8, 16]
