"""`checkout-sidecar`: the command line. Argument parsing only; the work is elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from proxy.config.loader import DEFAULT_CONFIG_PATH, ConfigError, json_schema, load_config
from proxy.config.model import Config
from proxy.observability import tracing
from proxy.observability.logging import LOG_SECRETS, setup_logging
from proxy.observability.tracing import configure as configure_tracing
from proxy.observability.tracing import from_environment as tracing_from_environment
from proxy.storage.url import redact_url


def _prepare(path: str, loop: str = "auto") -> Config | None:
    """Load the config and set up the process (event loop, logs, traces) for it.

    `loop` is `auto` (uvloop when installed), `uvloop` or `asyncio`: the plain loop
    is there to compare with (the benchmark runs both) and to rule uvloop out.
    """
    from proxy.app import install_uvloop

    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None
    if loop != "asyncio" and not install_uvloop() and loop == "uvloop":
        print("--loop uvloop: uvloop is not installed (pip install uvloop)", file=sys.stderr)
        return None
    LOG_SECRETS.use(config.file_secrets)
    setup_logging(config.log.level)
    configure_tracing(tracing_from_environment())
    return config


def _serve(main: Coroutine[Any, Any, None]) -> int:
    try:
        asyncio.run(main)
    finally:
        tracing.TRACING.shutdown()  # flush the spans still batched
    return 0


def _run(args: argparse.Namespace) -> int:
    from proxy.app import serve

    config = _prepare(args.config, args.loop)
    if config is None:
        return 1

    return _serve(serve(config, config_path=args.config, ready=print_banner))


def print_banner(addresses: dict[str, str]) -> None:
    """The addresses for a person at a terminal; a pipe gets them in the JSON `start` line.

    Stdout is what a log shipper reads: every line on it must be JSON.
    """
    if not sys.stdout.isatty():
        return
    for role, url in addresses.items():
        print(f"checkout-sidecar {role} on {url}", flush=True)


def _worker(args: argparse.Namespace) -> int:
    from proxy.app import serve_worker

    config = _prepare(args.config, args.loop)
    if config is None:
        return 1
    if sys.stdout.isatty():  # a pipe gets the JSON `worker_start` line only
        print(f"checkout-sidecar worker on {redact_url(config.queue_store)}", flush=True)
    return _serve(serve_worker(config))


def _validate(args: argparse.Namespace) -> int:
    try:
        load_config(args.file)
    except ConfigError as exc:
        for error in exc.errors:
            print(error)
        return 1
    print("ok")
    return 0


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def _simulator(args: argparse.Namespace) -> int:
    from proxy.simulator import SimulatorConfigError, run_simulator

    try:
        run_simulator(args.config)
    except SimulatorConfigError as exc:
        print(f"invalid simulator config:\n{exc}", file=sys.stderr)
        return 1
    return 0


def _demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return run_demo(args.config)


def _loop_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop (default: uvloop when installed)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="checkout-sidecar",
        description="Resilience sidecar for checkout backends.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the sidecar")
    run.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="YAML config file")
    _loop_option(run)
    run.set_defaults(func=_run)

    worker = sub.add_parser("worker", help="run only the durable job workers")
    worker.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="YAML config file")
    _loop_option(worker)
    worker.set_defaults(func=_worker)

    validate = sub.add_parser("validate", help="check a config file; prints ok or every error")
    validate.add_argument("file")
    validate.set_defaults(func=_validate)

    schema = sub.add_parser("schema", help="print the JSON Schema of the config")
    schema.set_defaults(func=_schema)

    simulator = sub.add_parser("simulator", help="run the five simulated upstreams")
    simulator.add_argument(
        "--config", default="config/simulator.yaml", help="simulator YAML (default: %(default)s)"
    )
    simulator.set_defaults(func=_simulator)

    demo = sub.add_parser("demo", help="simulator + sidecar + a scripted run of checkouts")
    demo.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="sidecar YAML")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
