"""Run N workers of a multi-worker training on this machine: each a ``fashion-sd train`` process
with its own ``TF_CONFIG`` on loopback ports, their output prefixed with the worker's number.

  fashion-sd workers 2 -- --config configs/demo.yaml --set train.strategy=multi_worker

What each host of a real cluster runs by hand (README: "Several machines"), here on one machine:
to try a multi-worker run, or to split one box's GPUs into processes. When one worker fails
the others are stopped (they would wait for it); rerun with --resume to continue.

SIGINT (Ctrl-C) or SIGTERM is passed on to every worker once (the chief saves the train state,
the others stop); this launcher exits after them with 130 (SIGINT) or 143 (SIGTERM). A second
signal kills them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading

from fashion_sd.interrupt import SIGNALS, Stopped


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fashion-sd workers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", type=int, help="number of worker processes (2 or more)")
    parser.add_argument("train_args", nargs=argparse.REMAINDER,
                        help="after --: the arguments of `fashion-sd train`")
    args = parser.parse_args(argv)
    rest = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.n < 2:
        print("error: workers: give 2 or more (one process is plain `fashion-sd train`)",
              file=sys.stderr)
        return 2
    if not any(a.startswith("--config") for a in rest):
        print("error: workers: give the train arguments after --, e.g. -- --config "
              "configs/demo.yaml --set train.strategy=multi_worker", file=sys.stderr)
        return 2
    if "train.strategy=multi_worker" not in rest:
        rest = [*rest, "--set", "train.strategy=multi_worker"]
    if (problem := _config_problem(rest)) is not None:  # here, not N times from the workers
        print(f"error: workers: {problem}", file=sys.stderr)
        return 2
    ports = free_ports(args.n)
    procs = []
    for i in range(args.n):
        env = {**os.environ, "TF_CONFIG": tf_config(ports, i)}
        # their own session: a terminal's Ctrl-C reaches them once, from here, not twice (a
        # second signal means "stop at once" to a training run)
        procs.append(subprocess.Popen([sys.executable, "-m", "fashion_sd", "train", *rest],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, bufsize=1, start_new_session=True))

    def relay(i, proc):
        for line in proc.stdout:
            sys.stdout.write(f"[worker {i}] {line}")
            sys.stdout.flush()

    threads = [threading.Thread(target=relay, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    with SIGNALS.installed():
        try:
            codes = _wait(procs)
        except Stopped as stop:
            _join(threads)
            print(f"stopped by {stop.name}: every worker was passed it and has exited; continue "
                  "with the same command and --resume", file=sys.stderr)
            return stop.exit_code
    _join(threads)
    failed = [(i, c) for i, c in enumerate(codes) if c != 0]
    if failed:
        first = failed[0]
        then = ("it refused its input (its error is above): fix it and run the command again"
                if first[1] == 2 else "continue with the same command and --resume")
        print(f"error: worker {first[0]} exited with {first[1]}; the others were stopped; "
              f"{then}", file=sys.stderr)
        return first[1] if first[1] and first[1] > 0 else 1
    return 0


def _config_problem(train_args: list[str]) -> str | None:
    """What is wrong with the train arguments' config (a missing file, a bad value), or None."""
    from fashion_sd.config import ConfigError, load_config

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    known, _ = parser.parse_known_args(train_args)
    try:
        load_config(known.config, known.set)
    except ConfigError as exc:
        return str(exc)
    return None


def _wait(procs: list[subprocess.Popen]) -> list[int]:
    """Every worker's exit code; when one fails the others are stopped (they would wait for it),
    unless a stop signal, already passed on to them, is why it failed."""
    codes: list[int | None] = [None] * len(procs)
    with SIGNALS.forwarding(procs):
        while None in codes:
            for i, p in enumerate(procs):
                if codes[i] is None:
                    try:
                        codes[i] = p.wait(timeout=0.5)
                    except subprocess.TimeoutExpired:
                        continue
                    if codes[i] != 0 and not SIGNALS.received:
                        for q in procs:
                            if q.poll() is None:
                                q.terminate()
    return codes


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:  # the rest of each worker's output
        t.join(timeout=5)
