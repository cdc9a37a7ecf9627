"""The fashion assistant: a web page where a designer picks garment attributes and gets images.

  python scripts/app.py --config configs/demo.yaml --run runs/demo      # then open http://127.0.0.1:7860
  python scripts/app.py --config configs/paper_best.yaml --run runs/paper_best --auth ana:secret --share

Lists the base model and every checkpoint of --run (with val loss and FID/KID where scored);
--lora adds checkpoints from elsewhere. Images are saved under output.dir/assistant/ with their
settings; `scripts/generate.py --from-png FILE` reproduces any of them. Scripts can call the
app's `generate` endpoint with gradio_client (see the README).

SIGINT (Ctrl-C) or SIGTERM closes the server and exits with 130 (SIGINT) or 143 (SIGTERM), also
when started with SIGINT ignored (a script's background job); a picture being made is dropped.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fashion_sd import preflight
from fashion_sd.config import ConfigError, add_config_arguments, config_from_args
from fashion_sd.errors import reported
from fashion_sd.interrupt import SIGNALS, Stopped
from fashion_sd.sd import lora_file


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """USER:PASS, or @FILE holding USER:PASS (keeps the password out of the shell history)."""
    if text is None:
        return None
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise ConfigError(f"--auth {text}: file not found")
        text = path.read_text().strip()
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth must be USER:PASS (or @FILE holding USER:PASS)")
    return user, password


def check_args(args, cfg) -> Path | None:
    """Everything that can be wrong with the command line, before the model is built."""

    run = Path(args.run) if args.run else Path(cfg.output.dir)
    if args.run and not run.is_dir():
        raise ConfigError(f"--run {run}: no such folder (a training run's output.dir)")
    for path in args.lora:
        lora_file.check(path, "--lora")
    preflight.number("--queue-size", args.queue_size, low=1, integer=True)
    # Taken ports are found now, not after the model is built (and not in Gradio's words).
    preflight.port_free(args.host, args.port)
    return run if run.is_dir() else None


@reported()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--run", help="a training run's folder (default: output.dir)")
    parser.add_argument("--lora", action="append", default=[], metavar="CKPT",
                        help="another .lora.safetensors to offer (repeatable)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: this machine only; 0.0.0.0 for a LAN)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="a public gradio.live link")
    parser.add_argument("--auth", help="USER:PASS (or @FILE) asked for before the page opens")
    parser.add_argument("--queue-size", type=int, default=16,
                        help="requests that may wait; more get 'busy, try again'")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    run = check_args(args, cfg)
    auth = parse_auth(args.auth or os.environ.get("FASHION_SD_AUTH"))
    if (args.share or args.host not in ("127.0.0.1", "localhost", "::1")) and auth is None:
        logging.warning("the app is reachable from other machines without --auth")
    with SIGNALS.installed():
        try:
            code = serve(args, cfg, run, auth)
        except Stopped:  # before the server was up (building the model)
            code = 0
        if SIGNALS.received:  # Gradio's wait takes the signal's Stopped as Ctrl-C and returns
            stop = Stopped(SIGNALS.received[0])
            print(f"stopped by {stop.name}: the server is closed", file=sys.stderr)
            return stop.exit_code
    return code


def serve(args, cfg, run: Path | None, auth) -> int:
    """Build the model and serve the page until a stop signal (Gradio's ``block_thread``)."""
    from fashion_sd.serving.assistant import Assistant
    from fashion_sd.serving.webapp import build_app, launch

    assistant = Assistant(cfg, run, args.lora)  # a WeightsError is reported as bad input
    if assistant.random_init:
        print("NOTE: random-init weights: the images are noise (untrained demo weights)")
    try:
        launch(build_app(assistant, args.queue_size), assistant, args.host, args.port,
               share=args.share, auth=auth)
    except OSError as exc:  # taken since the check: Gradio's text names its env variables
        if "port" not in str(exc).lower():
            raise
        print(f"error: --port {args.port}: already in use on {args.host}; pick another port, "
              f"e.g. --port {args.port + 1}", file=sys.stderr)
        return 2
    return 0

