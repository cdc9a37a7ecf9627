"""Run a study: every run of a sweep file (training, then FID/KID), one results table and plots.

  python scripts/sweep.py --config configs/sweep_demo.yaml            # tiny, CPU, minutes
  python scripts/sweep.py --config configs/sweep_paper.yaml           # the paper's 12 runs
  python scripts/sweep.py --config configs/sweep_paper.yaml --only r4_lr5e-05_bs3 --set train.epochs=5
  python scripts/sweep.py --config configs/sweep_paper.yaml --tuner bayesian --max-trials 10

Writes OUTPUT/results.csv, results.md, fid_by_{rank,learning_rate,batch_size}.png and
loss_curves.png; each run in OUTPUT/<run name>/. Finished runs are skipped, interrupted ones
resumed, failed ones recorded; the sweep goes on.
"""

from __future__ import annotations

import argparse
import sys

from fashion_sd import preflight
from fashion_sd import sweep as sw
from fashion_sd.errors import FashionSDError


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
    args = parser.parse_args(argv)
    try:
        sweep = sw.load_sweep(args.config, args.overrides)
        names = [sw.run_name(r) for r in sweep.runs]
        unknown = sorted(set(args.only or []) - set(names))
        if unknown:
            raise sw.SweepError(f"--only {', '.join(unknown)}: not in {args.config}; runs: "
                                f"{', '.join(names)}")
        preflight.number("--max-trials", args.max_trials, low=1, integer=True)
        preflight.output_folder(f"{args.config}: output", sweep.output)
    except FashionSDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for name in names:
            print(f"{sweep.output / name}")
        return 0
    if args.tuner:
        table = sw.tune(sweep, args.tuner, args.max_trials)
    else:
        table = sw.run_sweep(sweep, args.only)
    print((sweep.output / "results.md").read_text())
    return 1 if (table.status == "failed").all() else 0

