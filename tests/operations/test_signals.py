"""Signals on the real process from its first moment: a SIGHUP or SIGTERM sent as soon
as the ports accept connections (a config reloader or an orchestrator does not wait
for a log line) must reload or stop the sidecar, never kill it by the default action.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import StartServer
from tests.operations import SidecarProcess, free_port

RUNS = 5


@pytest.fixture
async def backend(start_server: StartServer) -> TestServer:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": True})

    app = web.Application()
    app.router.add_get("/hello", hello)
    return await start_server(app)


def write_config(path: Path, backend: TestServer, listen: int, admin: int) -> None:
    data: dict[str, Any] = {
        "listen": f"127.0.0.1:{listen}",
        "admin": {"listen": f"127.0.0.1:{admin}"},
        "store": f"sqlite://{path.parent}/state.db",
        "shutdown": {"drain_delay": "50ms", "grace": "2s"},
        "reload": {"watch": False},
        "upstreams": {"backend": {"url": f"http://127.0.0.1:{backend.port}"}},
    }
    path.write_text(yaml.safe_dump(data))


def accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def until_both_accept(sidecar: SidecarProcess, ports: tuple[int, int]) -> None:
    """A tight connect loop on both ports (no sleep): the moment a reloader could act."""
    async with asyncio.timeout(20):
        while not all(accepts(port) for port in ports):
            assert sidecar.process.returncode is None, sidecar.stderr.read_text()
            await asyncio.sleep(0)


async def test_a_sighup_right_after_the_ports_bind_reloads_and_does_not_kill(
    backend: TestServer, tmp_path: Path
) -> None:
    for run in range(RUNS):
        ports = (free_port(), free_port())
        path = tmp_path / f"sidecar-{run}.yaml"
        write_config(path, backend, *ports)
        sidecar = await SidecarProcess(path).launch()
        try:
            await until_both_accept(sidecar, ports)
            sidecar.signal(signal.SIGHUP)
            await asyncio.sleep(0.3)
            assert sidecar.process.returncode is None, (
                f"run {run}: the SIGHUP killed the sidecar "
                f"(exit {sidecar.process.returncode}): {sidecar.stderr.read_text()}"
            )
            await sidecar.started()
            reloaded = await sidecar.wait_for_event("config_loaded")
            assert reloaded["msg"] == "config reloaded (SIGHUP)"
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{sidecar.listen}/backend/hello") as response,
            ):
                assert response.status == 200
            sidecar.signal(signal.SIGTERM)
            assert await sidecar.wait(10) == 0, sidecar.stderr.read_text()
        finally:
            await sidecar.kill()


async def test_a_sigterm_right_after_the_ports_bind_stops_cleanly(
    backend: TestServer, tmp_path: Path
) -> None:
    ports = (free_port(), free_port())
    path = tmp_path / "sidecar.yaml"
    write_config(path, backend, *ports)
    sidecar = await SidecarProcess(path).launch()
    try:
        await until_both_accept(sidecar, ports)
        sidecar.signal(signal.SIGTERM)
        assert await sidecar.wait(10) == 0, sidecar.stderr.read_text()
        assert sidecar.events("shutdown_complete"), sidecar.lines
    finally:
        await sidecar.kill()
