"""KerasTuner searches and distributed sweeps (``--tuner``, ``--distributed``): the file's search
space as KerasTuner hyperparameters, the grid as a KerasTuner oracle, and the chief / worker mode
whose chief serves KerasTuner's own servicer from a loop that a signal can stop
(docs/distributed-sweeps.md). Each trial is one run of :func:`fashion_sd.training.sweep.execute`,
recorded in the same results table a serial sweep writes.

KerasTuner imports TensorFlow, so this module is imported only when a search or a distributed
sweep runs; :mod:`fashion_sd.training.sweep` (grids, the table, ``--help``) stays light.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time
from concurrent import futures
from typing import Any

import grpc
import keras_tuner as kt
import pandas as pd
from keras_tuner.src import protos
from keras_tuner.src.distribute import oracle_chief
from keras_tuner.src.distribute import utils as dist_utils
from keras_tuner.src.engine import oracle as oracle_module

from fashion_sd.interrupt import SIGNALS, Stopped
from fashion_sd.rundir import SweepDir
from fashion_sd.training import (
    sweep as sweeps,  # sweeps.execute: tests replace it there
)
from fashion_sd.training.sweep import (
    SERVE_POLL,
    WATCH_SECONDS,
    Sweep,
    SweepError,
    _label,
    distributed_role,
    row_for,
    run_name,
    write_results,
)


def _objective_column(sweep: Sweep) -> str:
    return "best_kid" if sweep.objective == "kid_mean" else "final_val_loss"


def _space(sweep: Sweep):
    """``sweep.search`` as KerasTuner hyperparameters, known to the oracle before any trial."""

    hp = kt.HyperParameters()
    for key, spec in sweep.search.items():
        if "choices" in spec:
            hp.Choice(key, list(spec["choices"]))
        else:
            hp.Float(key, float(spec["min"]), float(spec["max"]),
                     sampling="log" if spec.get("log") else "linear")
    return hp


def _grid_oracle(names: list[str], **kwargs):
    """The grid as a KerasTuner oracle: trial ``i`` is the i-th run not done yet, ``{run: name}``.

    Not ``GridSearchOracle``: it derives each trial's values from an *ended* trial's, so with a
    single hyperparameter it keeps at most two trials running and further workers get IDLE
    (and ask again in a busy loop) until one ends. Here every run can start at once; the rest of
    the engine (hand-out, retries, the chief's server, a restarted worker's trial) is KerasTuner's.
    A run whose trial completed in an earlier search of this folder is not handed out again; one
    that failed is (as a serial sweep retries it); one that was running when the chief stopped is
    queued again by KerasTuner's own ``Oracle.reload``.
    """

    status = kt.engine.trial.TrialStatus

    class RunList(kt.Oracle):
        def __init__(self):
            hp = kt.HyperParameters()
            hp.Choice("run", names)
            super().__init__(hyperparameters=hp, **kwargs)
            self.handed: set[str] = set()  # the runs given out since this chief started

        def populate_space(self, trial_id):
            done = {t.hyperparameters.values.get("run") for t in self.trials.values()
                    if t.status == status.COMPLETED}
            for name in names:
                if name not in done and name not in self.handed:
                    self.handed.add(name)
                    return {"status": status.RUNNING, "values": {"run": name}}
            return {"status": status.STOPPED, "values": None}

        def reload(self):
            super().reload()  # puts the trials that were running into its retry queue
            self.handed |= {self.trials[i].hyperparameters.values.get("run")
                            for i in self._retry_queue}

    return RunList()


def _trial_run(sweep: Sweep, kind: str, values: dict) -> dict[str, Any]:
    """A trial's hyperparameter values as the sweep run (the overrides) they stand for."""
    if kind == "grid":
        return next(r for r in sweep.runs if run_name(r) == values["run"])
    return {key: values[key] for key in sweep.search}


def _tuner(sweep: Sweep, kind: str, max_trials: int, seed: int = 1,
           names: list[str] | None = None):
    """A KerasTuner tuner whose trials are sweep runs; its project is OUTPUT/tuner_<kind>."""

    column = _objective_column(sweep)
    if not seed:
        raise SweepError("a KerasTuner seed must be > 0 (its oracles draw a random one for 0)")
    # The sweep goes on past failed runs: no limit on consecutive failed trials (KerasTuner's
    # limit raises inside the oracle, on a distributed chief inside a worker's gRPC call).
    common = dict(objective=kt.Objective(sweep.objective, "min"), seed=seed,
                  max_consecutive_failed_trials=None)
    if kind == "grid":
        oracle = _grid_oracle(names if names is not None else [run_name(r) for r in sweep.runs],
                              **common)
    else:
        cls = {"random": kt.oracles.RandomSearchOracle,
               "bayesian": kt.oracles.BayesianOptimizationOracle}[kind]
        oracle = cls(max_trials=max_trials, hyperparameters=_space(sweep), **common)

    class SweepTuner(kt.engine.base_tuner.BaseTuner):
        current: str | None = None  # the run in progress: a stopped worker names it

        def run_trial(self, trial, *args, **kwargs):
            run = _trial_run(sweep, kind, trial.hyperparameters.values)
            self.current = run_name(run)
            folder = SweepDir(sweep.output)
            # a rerun trial that dies again must not read as done
            folder.outcome(kind, trial.trial_id).unlink(missing_ok=True)
            outcome = sweeps.execute(sweep, run)
            # The table is written from the run folders and this file (a Trial sent over gRPC
            # carries no message): serial and distributed tables are built the same way.
            folder.write_outcome(kind, trial.trial_id, outcome)
            self.current = None
            value = row_for(sweep, run, outcome).get(column)
            finite = value is not None and math.isfinite(value)
            if outcome["status"] != "finished" or (kind != "grid" and not finite):
                raise kt.errors.FailedTrialError(
                    f"run {run_name(run)}: {outcome['error'] or 'no ' + sweep.objective}")
            # a grid run that finished without the objective (e.g. evaluate: false) completed
            return {sweep.objective: float(value) if finite else math.inf}

        def on_trial_end(self, trial):
            super().on_trial_end(trial)
            if not dist_utils.has_chief_oracle():  # serial: a partial table after every trial
                trials_table(sweep, kind, self.oracle, names)

    return SweepTuner(oracle, directory=str(sweep.output), project_name=SweepDir(sweep.output).project(kind).name,
                      overwrite=False)


def _outcome(folder: SweepDir, kind: str, trial, holders: dict[str, str]) -> dict:
    outcome = folder.read_outcome(kind, trial.trial_id)
    if outcome is None:
        where = f" on {holders[trial.trial_id]}" if trial.trial_id in holders else ""
        return {"status": "failed",
                "error": f"unfinished: trial {trial.trial_id}{where} ({trial.status}) never "
                         "reported (its worker or the chief stopped); run the sweep again to "
                         "resume it"}
    return outcome


def trials_table(sweep: Sweep, kind: str, oracle, names: list[str] | None = None) -> pd.DataFrame:
    """The results table from the oracle's trials and what the run folders hold.

    Grid: one row per run in the sweep's order (``names``), as :func:`run_sweep` writes it; a run
    whose trial never reported is ``failed`` (``unfinished: ...``), one never handed out is ``not
    run``. Search: one row per trial, in trial order, with a ``trial`` column.
    """
    folder = SweepDir(sweep.output)
    trials = sorted(oracle.trials.values(), key=lambda t: int(t.trial_id))
    holders = {t.trial_id: tuner_id for tuner_id, t in list(oracle.ongoing_trials.items())}
    rows = []
    if kind == "grid":
        latest = {t.hyperparameters.values.get("run"): t for t in trials}  # a rerun wins
        names = names if names is not None else [run_name(r) for r in sweep.runs]
        for name in names:
            run = _trial_run(sweep, kind, {"run": name})
            trial = latest.get(name)
            rows.append(row_for(sweep, run, _outcome(folder, kind, trial, holders) if trial else None))
        return write_results(rows, sweep.output, _label(rows))
    for trial in trials:
        run = _trial_run(sweep, kind, trial.hyperparameters.values)
        row = row_for(sweep, run, _outcome(folder, kind, trial, holders))
        row["trial"] = f"{kind} {trial.trial_id}"
        rows.append(row)
    return write_results(rows, sweep.output, _label(rows), _objective_column(sweep))


def _need_search(sweep: Sweep) -> None:
    if not sweep.search:
        raise SweepError(f"{sweep.source}: --tuner needs a 'search' space (key: {{choices: [...]}} "
                         "or {min: ..., max: ..., log: true})")


def tune(sweep: Sweep, kind: str, max_trials: int, seed: int = 1) -> pd.DataFrame:
    """Random or Bayesian search over ``sweep.search``; every trial is an ordinary sweep run."""
    _need_search(sweep)
    tuner = _tuner(sweep, kind, max_trials, seed)
    tuner.search()
    return trials_table(sweep, kind, tuner.oracle)


# ---- chief / worker


def distributed(sweep: Sweep, kind: str = "grid", max_trials: int = 10, seed: int = 1,
                only: list[str] | None = None) -> pd.DataFrame | None:
    """Run this process's part of a distributed sweep (KerasTuner's chief / worker mode).

    A worker takes trials from the chief and runs each with :func:`execute` until the chief has
    none left; it returns None. The chief serves the oracle until every trial has ended and
    every worker has been told to stop, then writes the table (:func:`trials_table`, the serial
    sweep's) and returns it. Stopped (SIGINT, SIGTERM) it still writes the table, with the
    runs whose trials never reported marked failed, ``table.attrs["exit_code"]`` 130 or 143;
    a stopped worker raises :class:`~fashion_sd.interrupt.Stopped` after naming its run.
    SIGINT and SIGTERM are handled as :data:`fashion_sd.interrupt.SIGNALS` says once the
    command installed it.
    """
    role = distributed_role()
    if kind == "grid":
        names = [run_name(r) for r in sweep.runs if not only or run_name(r) in only]
        if not names:
            raise SweepError(f"{sweep.source}: no runs for a distributed grid")
    else:
        _need_search(sweep)
        names = None
    tuner = _tuner(sweep, kind, max_trials, seed, names)
    me, address = os.environ["KERASTUNER_TUNER_ID"], (
        f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}")
    if role == "worker":
        print(f"[{me}] taking {kind} trials from the chief at {address}", flush=True)
        try:
            tuner.search()
        except KeyboardInterrupt as stop:
            _worker_stopped(me, stop, tuner.current)
            raise
        print(f"[{me}] the chief has no trials left", flush=True)
        return None
    _check_port_free(os.environ["KERASTUNER_ORACLE_IP"], int(os.environ["KERASTUNER_ORACLE_PORT"]))
    print(f"[{me}] serving {kind} trials on {address}; start the workers with the same command "
          "and KERASTUNER_TUNER_ID=tuner1, tuner2, ...", flush=True)
    stop = threading.Event()
    threading.Thread(target=_watch, args=(tuner.oracle, stop, sweep, kind), daemon=True).start()
    exit_code = 0
    try:
        _serve(tuner, address)  # returns when every trial ended and every worker was told to stop
    except KeyboardInterrupt as signal_:
        exit_code = _exit_code(signal_)
        print(f"[{me}] stopped by {_signal_name(signal_)}: writing the table; runs still out are "
              "marked failed (unfinished). Start the chief again to hand them out again.",
              flush=True)
    finally:
        stop.set()
    table = trials_table(sweep, kind, tuner.oracle, names)
    table.attrs["exit_code"] = exit_code
    return table


def _serve(tuner, address: str) -> None:
    """KerasTuner's chief (``oracle_chief.start_server``: its servicer, its rule for the end) in a
    loop that a stop signal ends within SERVE_POLL seconds, its gRPC server stopped.

    KerasTuner's own loop checks every 20 s, never stops its server, and is left only by an
    exception raised wherever its main thread is, possibly inside the oracle's lock, which its
    ``synchronized`` never releases then: a gRPC thread waiting on it would hang the exit.
    """

    tuner.save()  # as BaseTuner.search does before serving
    servicer = oracle_chief.OracleServicer(tuner.oracle)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    server.add_insecure_port(address)
    server.start()
    try:
        with SIGNALS.deferred():  # a signal is only recorded here; the loop sees it
            while not SIGNALS.received:
                if servicer.stop_triggered and _all_ended(tuner.oracle):
                    return
                time.sleep(SERVE_POLL)
    finally:
        server.stop(grace=None)
    SIGNALS.raise_if_stopped()


def _all_ended(oracle) -> bool:
    """``oracle_chief.exit_chief`` (no trial out, every worker told to stop) under the oracle's
    lock held by ``with``, which a second signal's exception releases."""

    with oracle_module.LOCKS[oracle]:
        return not oracle.ongoing_trials and not oracle.tuner_ids


def _signal_name(stop: KeyboardInterrupt) -> str:
    return stop.name if isinstance(stop, Stopped) else "SIGINT"


def _exit_code(stop: KeyboardInterrupt) -> int:
    return stop.exit_code if isinstance(stop, Stopped) else 128 + signal.SIGINT


def _worker_stopped(me: str, stop: KeyboardInterrupt, run: str | None) -> None:
    """A stopped worker leaves its trial with the chief (no report): the same tuner id started
    again gets it back and resumes the run from what it saved."""
    where = (f" during run {run}: the chief keeps its trial for {me}; start this worker again "
             f"with KERASTUNER_TUNER_ID={me} to resume the run" if run else
             " between runs; start it again with the same command to take more")
    print(f"[{me}] stopped by {_signal_name(stop)}{where}", flush=True)


def _check_port_free(ip: str, port: int) -> None:
    """The chief's address can be served: gRPC binds with SO_REUSEPORT, so a second chief on a
    busy port would start without a word and share the workers' requests with the first."""

    try:
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as sock:
            sock.bind((ip, port))
    except OSError as exc:
        raise SweepError(f"--distributed: the chief cannot serve on {ip}:{port} ({exc.strerror}): "
                         "is another chief running there? Pick a free KERASTUNER_ORACLE_PORT, "
                         "and set KERASTUNER_ORACLE_IP to an address of the chief's host") from None


def _watch(oracle, stop: threading.Event, sweep: Sweep, kind: str) -> None:
    """Every WATCH_SECONDS, name the trials the chief is waiting for and how to recover one.

    KerasTuner has no heartbeat: a worker that dies keeps its trial (and the chief) waiting.
    Started again with the same KERASTUNER_TUNER_ID it gets that trial back
    (``Oracle.create_trial``: ``if tuner_id in self.ongoing_trials: return ...``).
    """
    project = SweepDir(sweep.output).project(kind)
    while not stop.wait(WATCH_SECONDS):
        try:
            ongoing = list(oracle.ongoing_trials.items())
        except RuntimeError:  # changed while copied
            continue
        for tuner_id, trial in ongoing:
            try:
                started = (project / f"trial_{trial.trial_id}" / "trial.json").stat().st_mtime
                age = f", for {(time.time() - started) / 60:.0f} min"
            except OSError:
                age = ""
            values = trial.hyperparameters.values
            name = values.get("run") if kind == "grid" else run_name(_trial_run(sweep, kind, values))
            print(f"[chief] waiting for trial {trial.trial_id} (run {name}) on {tuner_id}{age}. "
                  f"If that worker died, start it again with KERASTUNER_TUNER_ID={tuner_id}: it "
                  "resumes the run. Or stop this chief (Ctrl-C): the table marks the run failed "
                  "(unfinished) and the chief's next start hands it out again.", flush=True)
