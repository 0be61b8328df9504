"""`python -m proxy.simulator --config config/simulator.yaml`, without the sidecar's CLI."""

import argparse
import sys

from . import SimulatorConfigError, run_simulator


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m proxy.simulator")
    parser.add_argument("--config", help="simulator YAML (default: built-in, free ports)")
    args = parser.parse_args()
    try:
        run_simulator(args.config)
    except SimulatorConfigError as exc:
        sys.exit(f"invalid simulator config:\n{exc}")


if __name__ == "__main__":
    main()
