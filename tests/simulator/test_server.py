"""Starting and stopping: ports, the Python API and the blocking CLI runner."""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
import sys

import aiohttp
import pytest

from proxy.simulator import SimulatorConfigError, start_simulator
from proxy.simulator.config import UPSTREAMS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_free_ports_are_distinct_and_urls_use_them(sim):
    assert set(sim.ports) == set(UPSTREAMS)
    assert len(set(sim.ports.values())) == 5
    assert sim.url("fraud") == f"http://127.0.0.1:{sim.ports['fraud']}"


async def start_on_a_free_port(name: str, attempts: int = 5):
    """A simulator with `name` on a port chosen here. A port found free may be taken
    before the simulator binds it (by another test process, or by the other four
    upstreams' own port-0 binds, which the kernel serves from the same range): then
    start again on another port, so the test does not race."""
    for attempt in range(attempts):
        port = free_port()
        try:
            return port, await start_simulator(ports={name: port})
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


async def test_explicit_ports_are_used(http):
    port, simulator = await start_on_a_free_port("coupon")
    async with simulator:
        assert simulator.ports["coupon"] == port
        async with http.get(f"http://127.0.0.1:{port}/_stats") as response:
            assert (await response.json())["upstream"] == "coupon"


async def test_unknown_port_name_is_refused():
    with pytest.raises(ValueError, match="unknown upstreams"):
        await start_simulator(ports={"paymnet": 1})


async def test_invalid_dict_config_is_refused():
    with pytest.raises(SimulatorConfigError, match=r"upstreams\.fraud\.hang_rate"):
        await start_simulator({"upstreams": {"fraud": {"hang_rate": -1}}})


async def test_a_taken_port_fails_start_and_frees_the_others():
    async with await start_simulator() as first:
        taken = first.ports["payment"]
        with pytest.raises(OSError):
            await start_simulator(ports={"shipping": taken})


async def test_cli_prints_urls_serves_and_stops_on_sigterm(tmp_path):
    config = tmp_path / "sim.yaml"
    config.write_text("upstreams: {payment: {port: 0}}\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy.simulator",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        lines = [
            (await asyncio.wait_for(process.stdout.readline(), 10)).decode() for _ in UPSTREAMS
        ]
        urls = dict(line.split() for line in lines)
        assert set(urls) == set(UPSTREAMS)
        async with (
            aiohttp.ClientSession() as http,
            http.post(urls["payment"] + "/authorize", json={"amount": 1, "currency": "EUR"}) as r,
        ):
            assert r.status == 201
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
