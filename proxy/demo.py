"""`checkout-sidecar demo`: the five simulated upstreams, the sidecar, and a scripted story.

A newcomer runs `make demo` on a fresh clone and sees, in one table, what the
sidecar does for a checkout when its upstreams misbehave: fallbacks, a deferred
coupon refunded later, a declined card undone, a breaker opening and closing,
an idempotent replay. Everything runs in this process on loopback ports (the
configured ones when free, else any free one), the durable state goes to a
temporary directory, and everything started here is stopped before returning.

The story itself lives in `demo_story.py`; this module sets the stage: it builds
the demo's config from the user's YAML (upstream URLs pointed at the simulator,
a temporary store, a short breaker `open_for`), starts and stops the servers,
and keeps the logs out of the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import socket
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml
from aiohttp import web
from yarl import URL

from proxy.app import Sidecar
from proxy.config import source
from proxy.config.loader import ConfigError, validate_text
from proxy.config.model import Config
from proxy.simulator import Simulator, SimulatorConfig, SimulatorConfigError, start_simulator
from proxy.simulator import load_config as load_simulator_config

SIMULATOR_CONFIG = "simulator.yaml"  # looked up beside the sidecar's config
QUIET_LOGGERS = (
    "proxy",
    "aiohttp.access",
    "aiohttp.server",
    "aiohttp.client",
    "aio_pika",
    "aiormq",
)

# What the demo changes in the user's config so the story fits in a few seconds.
DEMO_BREAKER = {"open_for": "2s", "min_calls": 8}  # payment's breaker
DEMO_QUEUE_RETRY = {"base": "200ms", "multiplier": 2, "max": "1s"}  # job queue backoff


@dataclass
class Stage:
    """What the story drives: the simulator, the sidecar and their URLs."""

    simulator: Simulator
    sidecar: Sidecar
    url: str  # the sidecar's data plane
    admin_url: str
    overrides: list[str]
    events: DemoEvents | None = None  # the demo's own consumer, when DEMO_BROKER is set


@dataclass
class DemoEvents:
    """What the demo's consumer received: (type, subject, id) in arrival order."""

    broker: str  # redacted
    exchange: str
    received: list[tuple[str, str, str]]


@contextlib.asynccontextmanager
async def demo_consumer(broker: str, exchange: str) -> AsyncIterator[DemoEvents]:
    """An exclusive auto-delete queue bound to every type on `exchange`; the exchange
    is deleted after (it is the demo's own, uniquely named)."""
    import json

    import aio_pika

    from proxy.storage.url import redact_url

    events = DemoEvents(redact_url(broker), exchange, [])
    connection = await aio_pika.connect(broker)
    try:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(ex, routing_key="#")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                try:
                    body = json.loads(message.body)
                    item = (str(body.get("type")), str(body.get("subject")), str(body.get("id")))
                except (ValueError, AttributeError):
                    item = (str(message.routing_key), "?", "?")
                events.received.append(item)

        await queue.consume(on_message)
        try:
            yield events
        finally:
            with contextlib.suppress(Exception):
                await queue.delete(if_unused=False, if_empty=False)
            with contextlib.suppress(Exception):
                await ex.delete()
    finally:
        await connection.close()


def run_demo(config_path: str, out: TextIO | None = None) -> int:
    """Run the whole demo; 0 when every invariant held, 1 when one did not, 2 on bad config."""
    out = out or sys.stdout
    with quiet_logs() as warnings:
        try:
            code = asyncio.run(run_demo_async(config_path, out))
        except (ConfigError, SimulatorConfigError) as exc:
            print(f"demo: invalid config:\n{exc}", file=sys.stderr)
            return 2
    if warnings:
        summary = ", ".join(f"{n}x {what}" for what, n in warnings.most_common())
        print(f"(sidecar logged {sum(warnings.values())} warnings: {summary})", file=out)
    return code


async def run_demo_async(config_path: str, out: TextIO) -> int:
    """The demo on the running loop: start everything, tell the story, stop everything."""
    from proxy.demo_story import tell_story

    async with stage(config_path) as running:
        return await tell_story(running, out)


@contextlib.asynccontextmanager
async def stage(config_path: str) -> AsyncIterator[Stage]:
    """Simulator and sidecar on loopback, state in a temporary directory; all stopped after."""
    simulator_config = _simulator_config(config_path)
    ports = {
        name: _port_or_free(simulator_config.host, simulator_config.upstream(name).port)
        for name in ("payment", "inventory", "shipping", "coupon", "fraud")
    }
    broker = os.environ.get("DEMO_BROKER", "").strip()
    async with contextlib.AsyncExitStack() as exits:
        events: DemoEvents | None = None
        if broker:
            exchange = f"checkout-sidecar-demo-{uuid.uuid4().hex[:12]}"
            events = await exits.enter_async_context(demo_consumer(broker, exchange))
        async with _stage(config_path, simulator_config, ports, events) as running:
            yield running


@contextlib.asynccontextmanager
async def _stage(
    config_path: str,
    simulator_config: SimulatorConfig,
    ports: dict[str, int],
    events: DemoEvents | None,
) -> AsyncIterator[Stage]:
    with tempfile.TemporaryDirectory(prefix="checkout-sidecar-demo-") as state_dir:
        simulator = await start_simulator(simulator_config, ports=ports)
        runners: list[web.AppRunner] = []
        try:
            config, overrides = demo_config(config_path, simulator, Path(state_dir), events)
            sidecar = Sidecar(config)
            urls = []
            for app, listen in (
                (sidecar.build_app(), config.listen),
                (sidecar.build_admin_app(), config.admin.listen),
            ):
                runner = web.AppRunner(app, access_log=None, handle_signals=False)
                await runner.setup()
                runners.append(runner)
                await web.TCPSite(runner, listen.host, listen.port).start()
                host, port = runner.addresses[0][:2]
                urls.append(f"http://{host}:{port}")
            sidecar.ready, sidecar.not_ready_reason = True, ""
            yield Stage(simulator, sidecar, urls[0], urls[1], overrides, events)
        finally:
            # the data-plane runner's cleanup closes the sidecar (workers, stores, pools)
            for runner in runners:
                await runner.cleanup()
            await simulator.close()


def demo_config(
    config_path: str,
    simulator: Simulator,
    state_dir: Path,
    events: DemoEvents | None = None,
) -> tuple[Config, list[str]]:
    """The user's config with its upstreams on the simulator, its state in `state_dir`,
    its listeners on free ports and a shorter breaker; and what was changed, for the header.
    """
    text = Path(config_path).read_text(encoding="utf-8")
    doc = source.parse(text, config_path, os.environ)
    if doc.errors or not isinstance(doc.data, dict):
        _, errors = validate_text(text, config_path)
        raise ConfigError(errors or list(doc.errors))
    data: dict[str, Any] = copy.deepcopy(doc.data)
    overrides: list[str] = []

    listen = _listen_or_free(data.get("listen", "127.0.0.1:8080"))
    admin = dict(data.get("admin") or {})
    admin["listen"] = _listen_or_free(admin.get("listen", "127.0.0.1:9901"))
    data["listen"], data["admin"] = listen, admin

    store = f"sqlite:///{state_dir / 'demo.db'}"
    data["store"] = store
    for section in ("idempotency", "queue"):
        if isinstance(data.get(section), dict):
            data[section].pop("store", None)
    overrides.append(f"store: {store} (deleted at exit)")

    upstreams = data.get("upstreams") or {}
    by_port = {
        simulator.config.upstream(name).port: simulator.url(name) for name in simulator.ports
    }
    for name, body in upstreams.items():
        if isinstance(body, dict) and "url" in body:
            body["url"] = _on_simulator(name, str(body["url"]), simulator, by_port)

    payment = upstreams.get("payment")
    if isinstance(payment, dict):
        payment["breaker"] = {**(payment.get("breaker") or {}), **DEMO_BREAKER}
        overrides.append(
            "upstreams.payment.breaker: " + ", ".join(f"{k} {v}" for k, v in DEMO_BREAKER.items())
        )
    queue = data.setdefault("queue", {})
    queue["retry"] = {**(queue.get("retry") or {}), **DEMO_QUEUE_RETRY}
    overrides.append("queue.retry: " + ", ".join(f"{k} {v}" for k, v in DEMO_QUEUE_RETRY.items()))

    if events is not None:
        broker = os.environ.get("DEMO_BROKER", "").strip()
        data["events"] = {
            **(data.get("events") or {}),
            "broker": broker,
            "exchange": events.exchange,
        }
        data["events"].pop("types", None)  # every type
        overrides.append(f"events: {events.broker}, exchange {events.exchange} (deleted at exit)")

    # every ${VAR} is already substituted: validate the result with an empty environment
    config, errors = validate_text(yaml.safe_dump(data, sort_keys=False), config_path, env={})
    if config is None:
        raise ConfigError(errors)
    return config, overrides


def _on_simulator(name: str, url: str, simulator: Simulator, by_port: Mapping[int, str]) -> str:
    """A simulated upstream's URL by name; any other loopback URL on a simulator port
    (the app callbacks on fraud's /_notify) moved to where that simulator port now is."""
    if name in simulator.ports:
        return simulator.url(name)
    parsed = URL(url)
    if (
        parsed.port is not None
        and parsed.port in by_port
        and parsed.host in ("127.0.0.1", "localhost")
    ):
        return by_port[parsed.port] + parsed.path.rstrip("/")
    return url


def _simulator_config(config_path: str) -> SimulatorConfig:
    path = Path(config_path).parent / SIMULATOR_CONFIG
    return load_simulator_config(path) if path.exists() else SimulatorConfig()


def _port_or_free(host: str, port: int) -> int:
    """`port` when nothing listens on it, else 0 (the OS picks a free one)."""
    if port == 0:
        return 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return 0
    return port


def _listen_or_free(listen: str) -> str:
    host, _, port = str(listen).rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        return f"{host}:{_port_or_free(host, int(port))}"
    except (ValueError, OSError):
        return "127.0.0.1:0"


class _Collect(logging.Handler):
    """Counts the sidecar's warnings instead of printing them through the table."""

    def __init__(self, counts: Counter[str]) -> None:
        super().__init__(logging.WARNING)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name == "proxy.jobs.worker" and "retry in" in message:
            self.counts["job retries"] += 1
        else:
            self.counts[f"{record.levelname.lower()} from {record.name}"] += 1


@contextlib.contextmanager
def quiet_logs() -> Any:
    """The proxy's loggers at WARNING and out of the output; their warnings counted."""
    counts: Counter[str] = Counter()
    handler = _Collect(counts)
    saved = []
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(logging.WARNING)
        logger.propagate = False
        logger.addHandler(handler)
    try:
        yield counts
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
