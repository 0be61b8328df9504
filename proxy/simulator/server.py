"""Starting and stopping the five upstreams: one aiohttp app per loopback port.

Separate ports, not one app with prefixes, because the sidecar treats them as
separate hosts with separate connection pools, breakers and bulkheads; the
simulator must look the same from the outside.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from aiohttp import web

from . import common, coupon, fraud, inventory, payment, shipping
from .config import UPSTREAMS, SimulatorConfig, load_config, parse_config, parse_faults
from .ledger import Ledger
from .middleware import fault_middleware
from .state import SimulatorState

RoutesOf = Callable[[str, Any, Ledger], list[web.RouteDef]]
"""An upstream's routes from its name, its own options type and the ledger."""

API_ROUTES: dict[str, RoutesOf] = {
    "payment": payment.routes,
    "inventory": inventory.routes,
    "shipping": shipping.routes,
    "coupon": coupon.routes,
    "fraud": fraud.routes,
}
SHUTDOWN_TIMEOUT_S = 2.0  # hanging requests are released on close; this is only a backstop


def build_app(name: str, state: SimulatorState) -> web.Application:
    """The aiohttp app of one upstream: its API, the common routes and the fault middleware."""
    app = web.Application(middlewares=[fault_middleware(name, state)])
    app.add_routes(API_ROUTES[name](name, state.config.upstream(name), state.ledger))
    app.add_routes(common.routes(name, state))
    return app


class Simulator:
    """Five running upstreams sharing one ledger. Use `start_simulator()` to get one."""

    def __init__(self, config: SimulatorConfig, host: str) -> None:
        self.config = config
        self.host = host
        self.state = SimulatorState(config)
        self.ports: dict[str, int] = {}
        self._runners: list[web.AppRunner] = []

    async def start(self, ports: Mapping[str, int]) -> None:
        try:
            for name in UPSTREAMS:
                # handler_cancellation: a hanging request ends when its client goes away.
                runner = web.AppRunner(
                    build_app(name, self.state),
                    access_log=None,
                    handler_cancellation=True,
                    shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                )
                await runner.setup()
                self._runners.append(runner)
                await web.TCPSite(runner, self.host, ports.get(name, 0)).start()
                self.ports[name] = runner.addresses[0][1]
        except BaseException:
            await self.close()
            raise

    @property
    def ledger(self) -> Ledger:
        """The live ledger object, for in-process tests that read state directly."""
        return self.state.ledger

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.ports[name]}"

    def set_faults(self, name: str, faults: Mapping[str, Any]) -> None:
        """Replace `name`'s faults, as `POST /_faults` does; raises SimulatorConfigError."""
        self.state.set_faults(name, parse_faults(dict(faults)))

    def stats(self, name: str) -> dict[str, Any]:
        return self.state.stats(name)

    async def wait_for_hits(self, name: str, count: int) -> None:
        """Wait until `name` has seen `count` API requests (e.g. that many are now hanging)."""
        await self.state.wait_for_hits(name, count)

    def reset(self) -> None:
        """As `POST /_reset`: empty ledger, zero stats, the configured faults."""
        self.state.reset()

    async def close(self) -> None:
        self.state.stopping.set()
        runners, self._runners = self._runners, []
        for runner in reversed(runners):
            await runner.cleanup()

    async def __aenter__(self) -> Simulator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def start_simulator(
    config: SimulatorConfig | Mapping[str, Any] | None = None,
    *,
    host: str | None = None,
    ports: Mapping[str, int] | None = None,
) -> Simulator:
    """Start all five upstreams; ports from `ports`, else the config, else free ones.

    `host` defaults to the config's host (127.0.0.1).
    """
    if not isinstance(config, SimulatorConfig):
        config = parse_config(dict(config or {}), source="simulator config")
    unknown = set(ports or {}) - set(UPSTREAMS)
    if unknown:
        raise ValueError(f"unknown upstreams in ports: {sorted(unknown)}; known: {UPSTREAMS}")
    chosen = {name: config.upstream(name).port for name in UPSTREAMS}
    chosen.update(ports or {})
    simulator = Simulator(config, host or config.host)
    await simulator.start(chosen)
    return simulator


def run_simulator(config_path: str | None) -> None:
    """Serve until SIGINT or SIGTERM; for `checkout-sidecar simulator --config FILE`."""
    config = load_config(config_path) if config_path else SimulatorConfig()
    asyncio.run(_serve(config))


async def _serve(config: SimulatorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with await start_simulator(config) as simulator:
        for name in UPSTREAMS:
            print(f"{name:<10} {simulator.url(name)}", flush=True)
        await stop.wait()
