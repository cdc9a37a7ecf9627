"""A study as one command: a base config, a list or grid of overrides, and for each run training
then evaluation, collected into one results table and the paper's figures.

Each run is its own process (``scripts/train.py``, ``scripts/evaluate_fid.py``), so a run that
crashes or runs out of memory is recorded as failed and the sweep goes on, and memory does not
pile up across runs. A run that already finished is skipped; one that was interrupted resumes.

``--tuner`` searches the file's ``search`` space with KerasTuner instead, each trial one run.
``--distributed`` runs the grid or the search in KerasTuner's chief / worker mode: the chief's
oracle hands the runs to worker processes (one GPU each) over gRPC, every run once, and the chief
writes the same table a serial sweep would (docs/distributed-sweeps.md).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fashion_sd import plots
from fashion_sd.training import paper
from fashion_sd.config import ConfigError, load_config, read_yaml_mapping
from fashion_sd.errors import FashionSDError
from fashion_sd.files import atomic_path, atomic_write_text
from fashion_sd.interrupt import SIGNALS, Stopped
from fashion_sd.rundir import RunDir

SHORT = {"lora.rank": "r", "lora.alpha": "a", "train.learning_rate": "lr", "train.batch_size": "bs",
         "train.epochs": "ep", "lora.targets": "t", "data.resolution": "px"}
SWEEP_KEYS = {"base", "output", "set", "runs", "grid", "evaluate", "include_base", "search",
              "objective"}


class SweepError(FashionSDError, ValueError):
    """A sweep file that cannot run; the message names the file and the key or run."""


@dataclass
class Sweep:
    source: Path
    base: Path  # the config each run starts from
    output: Path  # one folder per run below it
    set: list[str] = field(default_factory=list)  # overrides for every run
    runs: list[dict[str, Any]] = field(default_factory=list)
    evaluate: bool = True
    include_base: bool = False
    search: dict[str, Any] = field(default_factory=dict)  # the space for --tuner
    objective: str = "val_loss"  # or "kid_mean" for --tuner


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "-".join(map(str, value))
    return str(value)


def run_name(overrides: dict[str, Any]) -> str:
    """``{lora.rank: 4, train.learning_rate: 5e-5}`` -> ``r4_lr5e-05``; stable and readable."""
    parts = [f"{SHORT.get(k, k.rsplit('.', 1)[-1])}{_fmt(v)}" for k, v in overrides.items()]
    name = "_".join(parts) or "base"
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in name)


def overrides_list(overrides: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read and check a sweep file: every run's config is loaded (and so validated) up front.

    ``overrides`` (``key=value``, from ``--set``) apply to every run, after the file's ``set``.
    """
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: sweep file not found (see configs/sweep_*.yaml)")
    data = read_yaml_mapping(path, SweepError, "a sweep YAML such as configs/sweep_demo.yaml",
                             "keys (base, grid, runs, ...)")
    unknown = sorted(set(data) - SWEEP_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {', '.join(unknown)}; use {', '.join(sorted(SWEEP_KEYS))}")
    if "base" not in data:
        raise SweepError(f"{path}: 'base' (the config every run starts from) is required")
    base = (path.parent / data["base"]).resolve() if not Path(data["base"]).is_absolute() else Path(data["base"])
    runs = [dict(r) for r in data.get("runs") or []]
    grid = data.get("grid") or {}
    if grid:
        keys = list(grid)
        runs += [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    if not runs and not data.get("search"):
        raise SweepError(f"{path}: no runs: give 'runs' (a list of overrides), 'grid' or 'search'")
    sweep = Sweep(path, base, Path(data.get("output") or f"runs/{path.stem}"),
                  [*(str(s) for s in data.get("set") or []), *overrides], runs,
                  bool(data.get("evaluate", True)),
                  bool(data.get("include_base", False)), dict(data.get("search") or {}),
                  str(data.get("objective", "val_loss")))
    if sweep.objective not in ("val_loss", "kid_mean"):
        raise SweepError(f"{path}: 'objective' must be val_loss or kid_mean, got {sweep.objective!r}")
    names = [run_name(r) for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(f"{path}: runs repeat: {', '.join(dupes)}")
    for run in runs:
        try:
            config_for(sweep, run)
        except ConfigError as exc:
            raise SweepError(f"{path}: run {run_name(run)}: {exc}") from None
    for key, spec in sweep.search.items():
        ok = isinstance(spec, dict) and ("choices" in spec or {"min", "max"} <= set(spec))
        if not ok:
            raise SweepError(f"{path}: search.{key}: give {{choices: [...]}} or {{min: .., max: .., "
                             "log: true}")
        probe = spec["choices"][0] if "choices" in spec else spec["min"]
        try:
            config_for(sweep, {key: probe})
        except ConfigError as exc:
            raise SweepError(f"{path}: search.{key}: {exc}") from None
    return sweep


def config_for(sweep: Sweep, run: dict[str, Any]):
    return load_config(sweep.base, [*sweep.set, *overrides_list(run),
                                    f"output.dir={sweep.output / run_name(run)}"])


# --------------------------------------------------------------------------------------------
# Running


def _call(args: list[str], log: Path) -> int:
    """Run a script, its output appended to ``log``.

    A stop signal to this process is passed on to the script (a training run saves its train
    state and stops) and this process stops after it (:class:`~fashion_sd.interrupt.Stopped`);
    its own session keeps a terminal's Ctrl-C from reaching it a second time, directly, which a
    training run would take for "stop at once".
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(args)}\n")
        fh.flush()
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, cwd=Path.cwd(),
                                start_new_session=True)
        (code,) = SIGNALS.wait([proc])
    return code


def execute(sweep: Sweep, run: dict[str, Any], python: str = sys.executable) -> dict:
    """Train (or skip or resume) and evaluate one run; never raises for a failing run."""
    name = run_name(run)
    out = sweep.output / name
    sets = [*sweep.set, *overrides_list(run), f"output.dir={out}"]
    config_args = ["--config", str(sweep.base)] + [a for s in sets for a in ("--set", s)]
    log = out / "sweep.log"
    t0 = time.time()
    status = RunDir(out).status()
    if status == "finished":
        print(f"[{name}] finished earlier: training skipped")
    else:
        mode = ["--resume"] if RunDir(out).train_state.is_file() else []
        print(f"[{name}] training{' (resuming)' if mode else ''}; log: {log}", flush=True)
        rc = _call([python, "-m", "fashion_sd", "train", *config_args, *mode], log)
        if rc != 0:
            return {"run": name, "status": "failed", "error": _tail(log), "seconds": time.time() - t0}
    if sweep.evaluate:
        print(f"[{name}] evaluating", flush=True)
        args = [python, "-m", "fashion_sd", "evaluate", *config_args,
                "--checkpoints", str(RunDir(out).checkpoints)]
        if sweep.include_base:
            args.append("--include-base")
        if _call(args, log) != 0:
            return {"run": name, "status": "failed", "error": "evaluation: " + _tail(log),
                    "seconds": time.time() - t0}
    return {"run": name, "status": "finished", "error": "", "seconds": time.time() - t0}


def _tail(log: Path) -> str:
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:300]


# --------------------------------------------------------------------------------------------
# Results


def row_for(sweep: Sweep, run: dict[str, Any], outcome: dict | None = None) -> dict:
    """One results row from what a run left on disk."""
    name = run_name(run)
    out = RunDir(sweep.output / name)
    cfg = config_for(sweep, run)
    row: dict[str, Any] = {"run": name, **{k: _fmt(v) for k, v in run.items()},
                           "rank": cfg.lora.rank, "learning_rate": cfg.train.learning_rate,
                           "batch_size": cfg.train.batch_size,
                           "status": (outcome or {}).get("status") or out.status() or "not run",
                           "error": (outcome or {}).get("error", "")}
    hist = out.read_history()
    if hist is not None:
        if len(hist):
            row.update(final_loss=hist.loss.iloc[-1], final_val_loss=hist.val_loss.iloc[-1],
                       train_seconds=hist.seconds.iloc[-1])
    record = out.read_record()
    if record is not None:
        row["trainable_parameters"] = record.get("trainable_parameters")
        row["weights"] = record.get("weights", {}).get("id")
    fid = out.read_scores()
    if fid is not None:
        fid = fid[fid.checkpoint != "base"]
        if len(fid):
            best, best_kid = fid.loc[fid.fid.idxmin()], fid.loc[fid.kid_mean.idxmin()]
            row.update(best_fid=best.fid, best_fid_epoch=best.epoch, best_kid=best_kid.kid_mean,
                       best_kid_epoch=best_kid.epoch, comparable=bool(fid.comparable.all()),
                       n_generated=int(best.n_generated))
            # the checkpoint the run's eval.select chose, with its garment metrics
            chosen = fid[fid.selected.astype(str).isin(["True", "true"])] if "selected" in fid else fid.iloc[:0]
            if len(chosen):
                c = chosen.iloc[-1]
                row.update(selected=c.checkpoint, **{k: c.get(k) for k in SELECTED_METRICS})
    row["paper_fid"] = paper.reported_fid(cfg.lora.rank, cfg.train.learning_rate,
                                          cfg.train.batch_size)
    return row


SELECTED_METRICS = ["clip_score", "type_top1", "type_top3", "colour_top1", "gender_top1",
                    "on_model_rate", "colour_accuracy", "colour_judged_share", "cut_off_rate",
                    "cut_off_judged_share"]
RESULT_COLUMNS = ["run", "rank", "learning_rate", "batch_size", "status", "final_loss",
                  "final_val_loss", "best_fid", "best_fid_epoch", "best_kid", "best_kid_epoch",
                  "selected", *SELECTED_METRICS, "paper_fid", "trainable_parameters",
                  "train_seconds", "comparable", "weights", "error"]


def _selected(r, num) -> str:
    if not isinstance(r.get("selected"), str):
        return ""
    return (f"{r.selected}: {num(r.clip_score, '{:.1f}') or '-'} / {num(r.type_top1, '{:.2f}') or '-'}"
            f" / {num(r.get('colour_top1'), '{:.2f}') or '-'} / {num(r.get('gender_top1'), '{:.2f}') or '-'}"
            f" / {num(r.colour_accuracy, '{:.2f}') or '-'} / {num(r.cut_off_rate, '{:.2f}') or '-'}")


def write_results(rows: list[dict], out: Path, label: str = "", best_by: str | None = None) -> pd.DataFrame:
    """results.csv, results.md (best row marked), the FID-by-setting plots and all loss curves.

    The best row has the lowest ``best_by`` (default: best FID, else final val loss).
    """
    df = pd.DataFrame(rows)
    for col in RESULT_COLUMNS:
        if col not in df:
            df[col] = math.nan
    df = df[RESULT_COLUMNS + [c for c in df.columns if c not in RESULT_COLUMNS]]
    key = best_by or ("best_fid" if df.best_fid.notna().any() else "final_val_loss")
    best = df[key].idxmin() if df[key].notna().any() else None
    df["best"] = [i == best for i in df.index]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "results.csv") as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")
    lines = ["| run | rank | lr | batch | status | train loss | val loss | best FID (epoch) | "
             "best KID (epoch) | selected: CLIP / type, colour, gender top-1 (CLIP) / colour / cut off | paper FID | "
             "trainable | seconds |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |"]

    def num(v, fmt="{:.4g}"):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    for i, r in df.iterrows():
        mark = " **best**" if r.best else ""
        lines.append(
            f"| {r.run}{mark} | {r['rank']} | {r.learning_rate:g} | {r.batch_size} | {r.status} | "
            f"{num(r.final_loss)} | {num(r.final_val_loss)} | "
            f"{num(r.best_fid)}{' (' + num(r.best_fid_epoch, '{:g}') + ')' if num(r.best_fid) else ''} | "
            f"{num(r.best_kid)}{' (' + num(r.best_kid_epoch, '{:g}') + ')' if num(r.best_kid) else ''} | "
            f"{_selected(r, num)} | "
            f"{r.paper_fid if isinstance(r.paper_fid, str) else ''} | "
            f"{num(r.trainable_parameters, '{:,.0f}')} | {num(r.train_seconds, '{:.0f}')} |")
    notes = [f"Best row: lowest {key.replace('_', ' ')}."]
    if df.comparable.notna().any() and not df.comparable.fillna(True).all():
        notes.append("**NOT COMPARABLE**: FID/KID from an untrained Inception (demo mode).")
    notes.append("The paper's FIDs come from 3 test vs 3 generated images: context, not targets.")
    failed = df[df.status == "failed"]
    notes += [f"- {r.run} failed: {r.error}" for _, r in failed.iterrows()]
    atomic_write_text(out / "results.md", "# Sweep results\n\n" + "\n".join(lines) + "\n\n"
                      + "\n\n".join(notes) + "\n")
    plots.sweep_figures(df, out, label)
    histories = {r.run: h for _, r in df.iterrows()
                 if (h := RunDir(out / r.run).read_history()) is not None}
    if histories:
        plots.all_loss_curves(histories, out / "loss_curves.png", label)
    return df


def run_sweep(sweep: Sweep, only: list[str] | None = None) -> pd.DataFrame:
    rows = []
    for run in sweep.runs:
        name = run_name(run)
        if only and name not in only:
            continue
        outcome = execute(sweep, run)
        print(f"[{name}] {outcome['status']}" + (f": {outcome['error']}" if outcome["error"] else ""),
              flush=True)
        rows.append(row_for(sweep, run, outcome))
        write_results(rows, sweep.output, _label(rows))  # after every run: a partial table too
    return write_results(rows, sweep.output, _label(rows))


def _label(rows: list[dict]) -> str:
    weights = {r.get("weights") for r in rows if r.get("weights")}
    text = ", ".join(sorted(weights)) or "weights unknown"
    return f"RANDOM-INIT weights ({text})" if any("random" in w for w in weights) else f"weights: {text}"


# --------------------------------------------------------------------------------------------
# KerasTuner: the search over ``sweep.search`` (the paper's stated future work) and, with
# ``--distributed``, the grid too. Every trial is an ordinary sweep run (:func:`execute`);
# KerasTuner's engine hands the trials out, in this process or, in its chief / worker mode, to
# worker processes over gRPC (docs/distributed-sweeps.md).

TUNER_ENV = ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT")
OUTCOME = "sweep_outcome.json"  # execute()'s outcome, in the trial's KerasTuner folder
WATCH_SECONDS = 600.0  # how often a distributed chief names the trials it is waiting for
SERVE_POLL = 0.5  # seconds between a chief's checks for a stop signal or the last worker gone


def _objective_column(sweep: Sweep) -> str:
    return "best_kid" if sweep.objective == "kid_mean" else "final_val_loss"


def _space(sweep: Sweep):
    """``sweep.search`` as KerasTuner hyperparameters, known to the oracle before any trial."""
    import keras_tuner as kt

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
    import keras_tuner as kt

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
    import keras_tuner as kt
    from keras_tuner.src.distribute import utils as dist_utils

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
            done = Path(self.get_trial_dir(trial.trial_id)) / OUTCOME
            done.unlink(missing_ok=True)  # a rerun trial that dies again must not read as done
            outcome = execute(sweep, run)
            # The table is written from the run folders and this file (a Trial sent over gRPC
            # carries no message): serial and distributed tables are built the same way.
            atomic_write_text(done, json.dumps(outcome, default=str))
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

    return SweepTuner(oracle, directory=str(sweep.output), project_name=f"tuner_{kind}",
                      overwrite=False)


def _outcome(project: Path, trial, holders: dict[str, str]) -> dict:
    try:
        return json.loads((project / f"trial_{trial.trial_id}" / OUTCOME).read_text())
    except (OSError, ValueError):
        where = f" on {holders[trial.trial_id]}" if trial.trial_id in holders else ""
        return {"status": "failed",
                "error": f"unfinished: trial {trial.trial_id}{where} ({trial.status}) never "
                         "reported (its worker or the chief stopped); run the sweep again to "
                         "resume it"}


def trials_table(sweep: Sweep, kind: str, oracle, names: list[str] | None = None) -> pd.DataFrame:
    """The results table from the oracle's trials and what the run folders hold.

    Grid: one row per run in the sweep's order (``names``), as :func:`run_sweep` writes it; a run
    whose trial never reported is ``failed`` (``unfinished: ...``), one never handed out is ``not
    run``. Search: one row per trial, in trial order, with a ``trial`` column.
    """
    project = sweep.output / f"tuner_{kind}"
    trials = sorted(oracle.trials.values(), key=lambda t: int(t.trial_id))
    holders = {t.trial_id: tuner_id for tuner_id, t in list(oracle.ongoing_trials.items())}
    rows = []
    if kind == "grid":
        latest = {t.hyperparameters.values.get("run"): t for t in trials}  # a rerun wins
        names = names if names is not None else [run_name(r) for r in sweep.runs]
        for name in names:
            run = _trial_run(sweep, kind, {"run": name})
            trial = latest.get(name)
            rows.append(row_for(sweep, run, _outcome(project, trial, holders) if trial else None))
        return write_results(rows, sweep.output, _label(rows))
    for trial in trials:
        run = _trial_run(sweep, kind, trial.hyperparameters.values)
        row = row_for(sweep, run, _outcome(project, trial, holders))
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


def distributed_role(env=None) -> str:
    """``chief`` or ``worker``, from KerasTuner's variables; a SweepError names a missing one."""
    env = os.environ if env is None else env
    example = ("e.g. KERASTUNER_TUNER_ID=chief KERASTUNER_ORACLE_IP=10.0.0.1 "
               "KERASTUNER_ORACLE_PORT=8000 python scripts/sweep.py --config ... --distributed")
    missing = [name for name in TUNER_ENV if not env.get(name, "").strip()]
    if missing:
        raise SweepError(
            f"--distributed: {', '.join(missing)} not set. Every process of a distributed sweep "
            "needs KERASTUNER_TUNER_ID (chief for the one chief; tuner1, tuner2, ... one per "
            "worker), KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT (the chief's address and a "
            f"free port, the same in every process); {example} (docs/distributed-sweeps.md)")
    port = env["KERASTUNER_ORACLE_PORT"].strip()
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise SweepError(f"--distributed: KERASTUNER_ORACLE_PORT={port!r}: give a port number "
                         "(1-65535) that is free on the chief's host")
    return "chief" if "chief" in env["KERASTUNER_TUNER_ID"] else "worker"  # KerasTuner's rule


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
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

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
    from keras_tuner.src.engine import oracle as oracle_module

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
    import socket

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
    project = sweep.output / f"tuner_{kind}"
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
