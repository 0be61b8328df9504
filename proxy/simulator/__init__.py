"""The five simulated upstreams (payment, inventory, shipping, coupon, fraud).

Real semantics and a shared ledger, so tests, the demo and benchmarks can prove
what the sidecar did to the backends: nothing charged twice, nothing left
hanging. Faults (latency, errors, hangs, resets, slow bodies) come from YAML and
can be changed at run time.
"""

from .config import Faults, SimulatorConfig, SimulatorConfigError, load_config, parse_config
from .ledger import Ledger
from .server import Simulator, run_simulator, start_simulator

__all__ = [
    "Faults",
    "Ledger",
    "Simulator",
    "SimulatorConfig",
    "SimulatorConfigError",
    "load_config",
    "parse_config",
    "run_simulator",
    "start_simulator",
]
