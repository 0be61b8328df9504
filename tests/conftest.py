"""Fixtures shared by the suites: real loopback servers, configs from dicts, a sidecar."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
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


@pytest.fixture
async def start_sidecar(
    aiohttp_server: Any, tmp_path: Path
) -> Callable[..., Awaitable[tuple[Sidecar, str]]]:
    """Start a sidecar for a config dict; returns it and its base URL.

    Its durable state goes to a SQLite file of this test unless the dict names a store.
    """

    async def start(data: dict[str, Any], **kwargs: Any) -> tuple[Sidecar, str]:
        data = {"store": f"sqlite://{tmp_path}/state-{uuid.uuid4().hex[:8]}.db", **data}
        sidecar = Sidecar(make_config(data), **kwargs)
        server = await aiohttp_server(sidecar.build_app(), host="127.0.0.1")
        return sidecar, str(server.make_url("")).rstrip("/")

    return start
