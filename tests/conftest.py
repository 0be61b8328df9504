"""Fixtures shared by the suites: real loopback servers, configs from dicts, a sidecar."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import Sidecar
from proxy.config.loader import validate_text
from proxy.config.model import Config
from proxy.resilience.clock import FakeClock


def make_config(data: dict[str, Any]) -> Config:
    """A Config from a dict, through the same YAML validation a file gets."""
    config, errors = validate_text(yaml.safe_dump(data), "test.yaml", env={})
    if config is None:
        raise AssertionError("\n".join(str(e) for e in errors))
    return config


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


StartServer = Callable[[web.Application], Awaitable[TestServer]]


@pytest.fixture
async def start_server(aiohttp_server: Any) -> StartServer:
    """Start an aiohttp app on a free loopback port; returns the TestServer."""

    async def start(app: web.Application) -> TestServer:
        return await aiohttp_server(app, host="127.0.0.1")

    return start


async def serve_sidecar(sidecar: Sidecar, stack: AsyncExitStack) -> str:
    """Run `sidecar` as `serve` does (its low-level server on loopback); its base URL.

    `stack` stops the listener, then closes the sidecar, when the test ends.
    """
    await sidecar.start()
    stack.push_async_callback(sidecar.close)
    runner = web.ServerRunner(sidecar.build_server(), handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


@pytest.fixture
async def start_sidecar(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[tuple[Sidecar, str]]]]:
    """Start a sidecar for a config dict; returns it and its base URL.

    Its durable state goes to a SQLite file of this test unless the dict names a store.
    It runs on the low-level server `serve` uses, so the tests see production's path.
    """
    async with AsyncExitStack() as stack:

        async def start(data: dict[str, Any], **kwargs: Any) -> tuple[Sidecar, str]:
            data = {"store": f"sqlite://{tmp_path}/state-{uuid.uuid4().hex[:8]}.db", **data}
            sidecar = Sidecar(make_config(data), **kwargs)
            return sidecar, await serve_sidecar(sidecar, stack)

        yield start
