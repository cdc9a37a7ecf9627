"""Run a study: every run of a sweep file (training, then FID/KID), one results table and plots.

  python scripts/sweep.py --config configs/sweep_demo.yaml            # tiny, CPU, minutes
  python scripts/sweep.py --config configs/sweep_paper.yaml           # the paper's 12 runs
  python scripts/sweep.py --config configs/sweep_paper.yaml --only r4_lr5e-05_bs3 --set train.epochs=5
  python scripts/sweep.py --config configs/sweep_paper.yaml --tuner bayesian --max-trials 10

Writes OUTPUT/results.csv, results.md, fid_by_{rank,learning_rate,batch_size}.png and
loss_curves.png; each run in OUTPUT/<run name>/. Finished runs are skipped, interrupted ones
resumed, failed ones recorded; the sweep goes on.

Distributed (--distributed): KerasTuner's chief / worker mode. Run the same command once as the
chief and once per worker (one GPU each), told apart by three variables:
  KERASTUNER_TUNER_ID     chief for the chief; tuner1, tuner2, ... one per worker, unique
  KERASTUNER_ORACLE_IP    the chief's address (127.0.0.1 on one machine), the same everywhere
  KERASTUNER_ORACLE_PORT  a free port on the chief's host, the same everywhere

  KERASTUNER_TUNER_ID=chief   KERASTUNER_ORACLE_IP=127.0.0.1 KERASTUNER_ORACLE_PORT=8000 \\
    python scripts/sweep.py --config configs/sweep_demo.yaml --distributed &
  KERASTUNER_TUNER_ID=tuner1  KERASTUNER_ORACLE_IP=127.0.0.1 KERASTUNER_ORACLE_PORT=8000 \\
    CUDA_VISIBLE_DEVICES=0 python scripts/sweep.py --config configs/sweep_demo.yaml --distributed &
  KERASTUNER_TUNER_ID=tuner2  ... CUDA_VISIBLE_DEVICES=1 ... (same command)

Every run (grid) or trial (--tuner random|bayesian) runs once, on one worker; the chief writes
the table, equal to a serial sweep's, when all have ended. The output folder must be one shared
folder (the same path on every host). A worker killed mid-run and started again with the same
KERASTUNER_TUNER_ID resumes its run; the chief waits for it, naming it every 10 minutes. Stopped
(Ctrl-C), the chief writes the table with such a run marked failed (unfinished), and hands it out
again when started again. See docs/distributed-sweeps.md.

Stopping: SIGINT (Ctrl-C) or SIGTERM stops any of these processes within a second or so (a run
in progress is passed the signal first: training saves its state), with exit code 130 (SIGINT)
or 143 (SIGTERM); a second signal stops at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from fashion_sd import preflight
from fashion_sd.errors import reported
from fashion_sd.interrupt import SIGNALS, Stopped
from fashion_sd.training import sweep as sw


@reported()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a sweep file (configs/sweep_*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key in every run, e.g. --set train.epochs=5")
    parser.add_argument("--only", action="append", help="run only this run name (repeatable)")
    parser.add_argument("--tuner", choices=["random", "bayesian"],
                        help="search the file's 'search' space with KerasTuner instead")
    parser.add_argument("--max-trials", type=int, default=10)
    parser.add_argument("--dry-run", action="store_true", help="check the file and list the runs")
    parser.add_argument("--distributed", action="store_true",
                        help="run the grid (or --tuner search) in KerasTuner's chief / worker "
                             "mode; this process's role from KERASTUNER_TUNER_ID, the chief's "
                             "address from KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT "
                             "(see above)")
    args = parser.parse_args(argv)
    with SIGNALS.installed():
        try:
            return _run(args)
        except Stopped as stop:
            if not args.distributed:  # the chief and a worker have said what they leave
                print(f"stopped by {stop.name}: finished runs are kept; the same command again "
                      "skips them and resumes the interrupted one", file=sys.stderr)
            return stop.exit_code


def _run(args) -> int:
    role = sw.distributed_role() if args.distributed else None
    if not args.distributed and args.tuner and os.environ.get("KERASTUNER_ORACLE_IP"):
        raise sw.SweepError("KERASTUNER_ORACLE_IP is set, so KerasTuner would run this search "
                            "as a distributed chief or worker: add --distributed, or unset "
                            "KERASTUNER_ORACLE_IP for a serial search")
    sweep = sw.load_sweep(args.config, args.overrides)
    names = [sw.run_name(r) for r in sweep.runs]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        raise sw.SweepError(f"--only {', '.join(unknown)}: not in {args.config}; runs: "
                            f"{', '.join(names)}")
    preflight.number("--max-trials", args.max_trials, low=1, integer=True)
    preflight.output_folder(f"{args.config}: output", sweep.output)
    if args.dry_run:
        if role:
            print(f"{role} {os.environ['KERASTUNER_TUNER_ID']} of a distributed "
                  f"{args.tuner or 'grid'} sweep, chief at {os.environ['KERASTUNER_ORACLE_IP']}:"
                  f"{os.environ['KERASTUNER_ORACLE_PORT']}")
        for name in names:
            print(f"{sweep.output / name}")
        return 0
    if args.distributed or args.tuner:  # KerasTuner (and TensorFlow) only now
        from fashion_sd.training import tuning
    if args.distributed:
        table = tuning.distributed(sweep, args.tuner or "grid", args.max_trials, only=args.only)
        if table is None:  # a worker: the chief writes the table
            return 0
        print((sweep.output / "results.md").read_text())
        if table.attrs.get("exit_code"):
            return table.attrs["exit_code"]
        return 1 if (table.status == "failed").all() else 0
    if args.tuner:
        table = tuning.tune(sweep, args.tuner, args.max_trials)
    else:
        table = sw.run_sweep(sweep, args.only)
    print((sweep.output / "results.md").read_text())
    return 1 if (table.status == "failed").all() else 0

