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
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fashion_sd.config import ConfigError, load_config, read_yaml_mapping
from fashion_sd.errors import FashionSDError
from fashion_sd.interrupt import SIGNALS
from fashion_sd import paper
from fashion_sd.rundir import RunDir, SweepDir

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
    if not isinstance(grid, dict):
        raise SweepError(f"{path}: 'grid' must map keys to lists of values, e.g. "
                         "grid: {lora.rank: [4, 8]}")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{key}: give a list of one or more values, e.g. "
                             f"{key}: [{values if not isinstance(values, (list, dict)) else '...'}]")
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
        if ok and "choices" in spec:
            ok = isinstance(spec["choices"], list) and len(spec["choices"]) > 0
        if not ok:
            raise SweepError(f"{path}: search.{key}: give {{choices: [...]}} (one or more) or "
                             "{min: .., max: .., log: true}")
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


def _call(args: list[str], folder: SweepDir, name: str) -> int:
    """Run a script, its output appended to run ``name``'s log in the sweep's folder.

    A stop signal to this process is passed on to the script (a training run saves its train
    state and stops) and this process stops after it (:class:`~fashion_sd.interrupt.Stopped`);
    its own session keeps a terminal's Ctrl-C from reaching it a second time, directly, which a
    training run would take for "stop at once".
    """
    with folder.appending(name, " ".join(args)) as fh:
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
    folder = SweepDir(sweep.output)
    log = folder.log(name)
    t0 = time.time()
    status = RunDir(out).status()
    if status == "finished":
        print(f"[{name}] finished earlier: training skipped")
    else:
        mode = ["--resume"] if RunDir(out).train_state.is_file() else []
        print(f"[{name}] training{' (resuming)' if mode else ''}; log: {log}", flush=True)
        rc = _call([python, "-m", "fashion_sd", "train", *config_args, *mode], folder, name)
        if rc != 0:
            return {"run": name, "status": "failed", "error": _tail(log), "seconds": time.time() - t0}
    if sweep.evaluate:
        print(f"[{name}] evaluating", flush=True)
        args = [python, "-m", "fashion_sd", "evaluate", *config_args,
                "--checkpoints", str(RunDir(out).checkpoints)]
        if sweep.include_base:
            args.append("--include-base")
        if _call(args, folder, name) != 0:
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
        fid = fid[~fid.checkpoint.isin(["base", "real"])]
        if len(fid):
            best, best_kid = fid.loc[fid.fid.idxmin()], fid.loc[fid.kid_mean.idxmin()]
            row.update(best_fid=best.fid, best_fid_epoch=best.epoch, best_kid=best_kid.kid_mean,
                       best_kid_epoch=best_kid.epoch, comparable=bool(fid.comparable.all()),
                       n_generated=int(best.n_generated))
            for column in ("cmmd", "fd_dinov2"):  # empty where the run's evaluation had them off
                values = pd.to_numeric(fid.get(column, pd.Series(dtype=float)), errors="coerce")
                if values.notna().any():
                    row.update({f"best_{column}": values.min(),
                                f"best_{column}_epoch": fid.epoch[values.idxmin()]})
            # the checkpoint the run's eval.select chose, with its garment metrics
            chosen = fid[fid.selected.astype(str).isin(["True", "true"])] if "selected" in fid else fid.iloc[:0]
            if len(chosen):
                c = chosen.iloc[-1]
                row.update(selected=c.checkpoint, **{k: c.get(k) for k in SELECTED_METRICS})
    row["paper_fid"] = paper.reported_fid(cfg.lora.rank, cfg.train.learning_rate,
                                          cfg.train.batch_size)
    return row


SELECTED_METRICS = ["cmmd", "fd_dinov2", "coverage", "clip_score", "type_top1", "type_top3", "colour_top1", "gender_top1",
                    "on_model_rate", "colour_accuracy", "colour_judged_share", "cut_off_rate",
                    "cut_off_judged_share", "cut_off_low", "cut_off_high"]
RESULT_COLUMNS = ["run", "rank", "learning_rate", "batch_size", "status", "final_loss",
                  "final_val_loss", "best_fid", "best_fid_epoch", "best_kid", "best_kid_epoch",
                  "best_cmmd", "best_cmmd_epoch", "best_fd_dinov2", "best_fd_dinov2_epoch",
                  "selected", *SELECTED_METRICS, "paper_fid", "trainable_parameters",
                  "train_seconds", "comparable", "weights", "error"]


def _selected(r, num) -> str:
    if not isinstance(r.get("selected"), str):
        return ""
    return (f"{r.selected}: {num(r.clip_score, '{:.1f}') or '-'} / {num(r.type_top1, '{:.2f}') or '-'}"
            f" / {num(r.get('colour_top1'), '{:.2f}') or '-'} / {num(r.get('gender_top1'), '{:.2f}') or '-'}"
            f" / {num(r.colour_accuracy, '{:.2f}') or '-'} / {num(r.cut_off_rate, '{:.2f}') or '-'}")


def _best(r, column: str, num) -> str:
    """``0.123 (3)``: a run's best value of a distance and its epoch, or ``-``."""
    value = num(r.get(column))
    return f"{value} ({num(r.get(column + '_epoch'), '{:g}')})" if value else "-"


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
    lines = ["| run | rank | lr | batch | status | train loss | val loss | best FID (epoch) | "
             "best KID (epoch) | best CMMD / FD-DINOv2 (epoch) | selected: CLIP / type, colour, gender top-1 (CLIP) / colour / cut off | paper FID | "
             "trainable | seconds |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |"]

    def num(v, fmt="{:.4g}"):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

    for i, r in df.iterrows():
        mark = " **best**" if r.best else ""
        lines.append(
            f"| {r.run}{mark} | {r['rank']} | {r.learning_rate:g} | {r.batch_size} | {r.status} | "
            f"{num(r.final_loss)} | {num(r.final_val_loss)} | "
            f"{num(r.best_fid)}{' (' + num(r.best_fid_epoch, '{:g}') + ')' if num(r.best_fid) else ''} | "
            f"{num(r.best_kid)}{' (' + num(r.best_kid_epoch, '{:g}') + ')' if num(r.best_kid) else ''} | "
            f"{_best(r, 'best_cmmd', num)} / {_best(r, 'best_fd_dinov2', num)} | "
            f"{_selected(r, num)} | "
            f"{r.paper_fid if isinstance(r.paper_fid, str) else ''} | "
            f"{num(r.trainable_parameters, '{:,.0f}')} | {num(r.train_seconds, '{:.0f}')} |")
    notes = [f"Best row: lowest {key.replace('_', ' ')}."]
    if df.comparable.notna().any() and not df.comparable.fillna(True).all():
        notes.append("**NOT COMPARABLE**: FID/KID from an untrained Inception (demo mode).")
    notes.append("The paper's FIDs come from 3 test vs 3 generated images: context, not targets.")
    failed = df[df.status == "failed"]
    notes += [f"- {r.run} failed: {r.error}" for _, r in failed.iterrows()]
    folder = SweepDir(out)
    histories = {r.run: h for _, r in df.iterrows()
                 if (h := folder.run(r.run).read_history()) is not None}
    folder.write_results(df, "# Sweep results\n\n" + "\n".join(lines) + "\n\n"
                         + "\n\n".join(notes) + "\n", label, histories)
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
WATCH_SECONDS = 600.0  # how often a distributed chief names the trials it is waiting for
SERVE_POLL = 0.5  # seconds between a chief's checks for a stop signal or the last worker gone


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
