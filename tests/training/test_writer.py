"""The run folder's one writer: the chief writes, every other worker's writer writes nothing,
and pruning takes a checkpoint's raw weights and exports with it."""

import inspect

from fashion_sd.interop.lora_formats import FORMATS
from fashion_sd.rundir import RunDir
from fashion_sd.training.writer import RunWriter


class Mirror:
    pushes = 0

    def push(self):
        self.pushes += 1


def test_a_worker_that_is_not_the_chief_writes_nothing(tmp_path):
    run = RunDir(tmp_path / "run")
    mirror = Mirror()
    writer = RunWriter(run, chief=False, mirror=mirror)
    # Every method that writes, called as the callbacks call it: the arguments are never read.
    calls = {"clear": (), "save_config": (None,), "write_record": ({"status": "running"},),
             "save_checkpoint": ("last", None, {}, None, {}, ("kohya",)),
             "prune": ([run.epoch_checkpoint(1)], 0), "save_train_state": (None, {}, {}),
             "end_epoch": ([{"epoch": 1}], "label", None, {}, {}),
             "write_samples": (run.samples_at_epoch(1), [], "label", "title", [0]),
             "write_cards": ()}
    writing = {name for name, fn in inspect.getmembers(RunWriter, inspect.isfunction)
               if not name.startswith("_")} - {"push", "lock", "tensorboard"}
    assert writing == set(calls)  # a new writing method is added here too
    for name, args in calls.items():
        getattr(writer, name)(*args)
    writer.push()
    assert not run.root.exists() and mirror.pushes == 0
    assert writer.tensorboard() == []
    with writer.lock():  # no lock file either: the chief holds the folder's lock
        pass
    assert not run.root.exists()


def test_pruning_removes_the_oldest_checkpoints_with_their_raw_weights_and_exports(tmp_path):
    run = RunDir(tmp_path / "run")
    kept = [run.epoch_checkpoint(e) for e in (1, 2, 3)]
    others = {e: [run.raw_checkpoint(run.epoch_name(e)), *run.exports(kept[e - 1], FORMATS)]
              for e in (1, 2, 3)}
    for path in kept + [p for ps in others.values() for p in ps]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    RunWriter(run).prune(kept, keep_last=2)
    assert [p.exists() for p in kept] == [False, True, True]
    assert not any(p.exists() for p in others[1])
    assert all(p.exists() for e in (2, 3) for p in others[e])
