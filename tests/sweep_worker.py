"""One process of a distributed sweep in the tests: the real command (``fashion_sd sweep``, its
KerasTuner chief / worker code) with :func:`fashion_sd.training.sweep.execute` replaced by
:func:`fake_execute`, which writes a run folder the way a finished run leaves it in a second
instead of training an 860M-parameter U-Net.

    KERASTUNER_TUNER_ID=tuner1 KERASTUNER_ORACLE_IP=127.0.0.1 KERASTUNER_ORACLE_PORT=8000 \\
        python tests/sweep_worker.py --config configs/sweep_demo.yaml --distributed

Test knobs (environment):
  SWEEP_TEST_LOG      append "<event> <run> <tuner id> <pid>" lines here (start, done, failed,
                      killed, skipped)
  SWEEP_TEST_SECONDS  how long a fake run takes (default 0.3)
  SWEEP_TEST_KILL     a run name, or "first" for whichever run starts first: the process running
                      it SIGKILLs itself mid-run, once (a run found half-done, run.json "running",
                      is resumed and finishes)
  SWEEP_TEST_FAIL     a run name that fails, as a run that runs out of memory does
  SWEEP_TEST_BARRIER  a run does not finish before this many tuner ids have started runs (so two
                      workers provably run trials at once)
  SWEEP_TEST_HOLD     a run name whose fake run never ends by itself: logs "start", then waits
                      (for a stop signal, in the tests)
  SWEEP_TEST_WATCH    the chief's WATCH_SECONDS
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pandas as pd

from fashion_sd.rundir import RunDir
from fashion_sd.training import sweep as sw

FAKE_ERROR = "error: out of memory (fake)"


def log(event: str, name: str) -> None:
    path = os.environ.get("SWEEP_TEST_LOG")
    if path:
        who = os.environ.get("KERASTUNER_TUNER_ID", "serial")
        with open(path, "a") as fh:  # one short O_APPEND write per line: lines never interleave
            fh.write(f"{event} {name} {who} {os.getpid()}\n")


def read_log(path: str | Path) -> list[tuple[str, str, str, int]]:
    p = Path(path)
    lines = p.read_text().splitlines() if p.is_file() else []
    return [(e, n, t, int(pid)) for e, n, t, pid in (ln.split() for ln in lines if ln.strip())]


BARRIER_SECONDS = 900  # a bound for a broken test only: a loaded machine may start a worker late


def _barrier() -> None:
    want = int(os.environ.get("SWEEP_TEST_BARRIER", "0"))
    deadline = time.time() + BARRIER_SECONDS
    while want and time.time() < deadline:
        started = {t for e, _, t, _ in read_log(os.environ["SWEEP_TEST_LOG"]) if e == "start"}
        if len(started) >= want:
            return
        time.sleep(0.05)


def _kill(name: str) -> bool:
    target = os.environ.get("SWEEP_TEST_KILL")
    if target != "first":
        return target == name
    try:  # the first process to claim the marker is the one that dies
        os.close(os.open(os.environ["SWEEP_TEST_LOG"] + ".killed", os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def fake_execute(sweep: sw.Sweep, run: dict, python: str = sys.executable) -> dict:
    """What :func:`fashion_sd.training.sweep.execute` does and leaves behind, without training."""
    name = sw.run_name(run)
    out = RunDir(sweep.output / name)
    if out.status() == "finished":
        log("skipped", name)
        return {"run": name, "status": "finished", "error": "", "seconds": 0.0}
    resumed = out.status() == "running"
    log("start", name)
    out.root.mkdir(parents=True, exist_ok=True)
    out.run_json.write_text(json.dumps({"status": "running"}))
    _barrier()
    while os.environ.get("SWEEP_TEST_HOLD") == name:  # a run that is still going when signalled
        time.sleep(0.05)
    time.sleep(float(os.environ.get("SWEEP_TEST_SECONDS", "0.3")))
    if not resumed and _kill(name):
        log("killed", name)
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("SWEEP_TEST_FAIL") == name:
        out.run_json.write_text(json.dumps({"status": "stopped"}))
        log("failed", name)
        return {"run": name, "status": "failed", "error": FAKE_ERROR, "seconds": 1.0}
    cfg = sw.config_for(sweep, run)
    loss = 0.05 * cfg.lora.rank + 100 * cfg.train.learning_rate
    pd.DataFrame({"epoch": [1, 2], "step": [2, 4], "loss": [loss + 0.2, loss],
                  "val_loss": [loss + 0.3, loss + 0.1], "lr": cfg.train.learning_rate,
                  "skipped_steps": 0, "seconds": [5.0, 10.0]}).to_csv(out.history, index=False)
    out.eval.mkdir(exist_ok=True)
    pd.DataFrame({"checkpoint": ["base", "epoch_001", "epoch_002"], "epoch": [None, 1, 2],
                  "fid": [400.0, 300 - loss, 290 - loss], "kid_mean": [0.5, 0.2, 0.1 + loss],
                  "kid_std": 0.01, "n_real": 2, "n_generated": 2, "comparable": False,
                  "selected": [False, False, True], "clip_score": [20.0, 21.0, 22.0 + loss],
                  "type_top1": 0.5, "type_top3": 0.75, "on_model_rate": 0.5,
                  "colour_accuracy": 0.25, "cut_off_rate": 0.0}).to_csv(out.scores, index=False)
    out.run_json.write_text(json.dumps({"status": "finished", "trainable_parameters": 1000 * cfg.lora.rank,
                                        "weights": {"id": "random-init(seed=42)"}}))
    log("done", name)
    return {"run": name, "status": "finished", "error": "", "seconds": 1.0}


def main(argv: list[str] | None = None) -> int:
    from fashion_sd.commands import sweep as command

    sw.execute = fake_execute
    sw.WATCH_SECONDS = float(os.environ.get("SWEEP_TEST_WATCH", sw.WATCH_SECONDS))
    return command.main(argv)


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # skip the interpreter's teardown (TensorFlow, gRPC threads): ~2 s a process
