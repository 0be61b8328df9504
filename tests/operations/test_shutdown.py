"""SIGTERM on the real process: not ready at once, drain, finish what is in flight, exit 0.

The sidecar runs as `python -m proxy run` in front of the simulator (for the
composite checkout) and a small upstream of this test whose `/slow` answers
after a delay and whose `/hang` does not answer until the test lets it.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.simulator import Simulator, start_simulator
from proxy.storage.open import open_journal
from tests.checkout.conftest import ORDER, simulator_config
from tests.checkout.conftest import sidecar_config as checkout_config
from tests.conftest import StartServer
from tests.operations import SidecarProcess, until

SLOW_SECONDS = 2.0
DRAIN_DELAY = 0.5


@dataclass
class Backend:
    url: str
    arrived: int = 0
    arrivals: asyncio.Condition = field(default_factory=asyncio.Condition)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout), self.arrivals:
            await self.arrivals.wait_for(lambda: self.arrived >= count)


@pytest.fixture
async def backend(start_server: StartServer) -> AsyncIterator[Backend]:
    holder: dict[str, Backend] = {}

    async def arrive() -> Backend:
        backend = holder["backend"]
        async with backend.arrivals:
            backend.arrived += 1
            backend.arrivals.notify_all()
        return backend

    async def slow(request: web.Request) -> web.Response:
        await arrive()
        await asyncio.sleep(SLOW_SECONDS)
        return web.json_response({"slow": True})

    async def hang(request: web.Request) -> web.Response:
        backend = await arrive()
        await asyncio.wait_for(backend.release.wait(), 30)
        return web.json_response({"hung": True})

    async def fast(request: web.Request) -> web.Response:
        return web.json_response({"fast": True})

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/hang", hang)
    app.router.add_get("/fast", fast)
    server = await start_server(app)
    holder["backend"] = Backend(str(server.make_url("")).rstrip("/"))
    yield holder["backend"]
    holder["backend"].release.set()


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with await start_simulator(simulator_config()) as simulator:
        yield simulator


def write_config(
    path: Path, sim: Simulator, backend: Backend, store: str, **shutdown: str
) -> dict[str, Any]:
    """The shipped checkout config aimed at `sim`, plus `backend` as the upstream `slow`."""
    data = checkout_config(sim, store)
    data["upstreams"]["slow"] = {
        "url": backend.url,
        "timeout": {"per_try": "30s", "total": "30s"},
        "retry": {"attempts": 1},
    }
    data["shutdown"] = shutdown
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return data


async def checkout(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    headers = {"Idempotency-Key": f"shutdown-{uuid.uuid4().hex[:12]}"}
    async with http.post(f"{url}/checkout", json=ORDER, headers=headers) as response:
        return response.status, await response.json()


async def status_of(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json()


async def fresh_connection_status(url: str) -> int | None:
    """The status of a GET on a new TCP connection; None when the connection is refused."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        try:
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                return response.status
        except aiohttp.ClientConnectorError:
            return None


async def wait_not_ready(admin: str, seconds: float = 2.0) -> float:
    """Poll /readyz until it answers 503; returns when it did (time.monotonic())."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(seconds):
        while True:
            status, body = await status_of(http, f"{admin}/readyz")
            if status == 503:
                assert body == {"status": "not ready", "reason": "shutting down"}
                return time.monotonic()
            await asyncio.sleep(0.005)


async def test_sigterm_lets_every_request_and_checkout_in_flight_finish_then_exits_0(
    tmp_path: Path, sim: Simulator, backend: Backend
) -> None:
    store = f"sqlite://{tmp_path}/state.db"
    path = tmp_path / "sidecar.yaml"
    write_config(path, sim, backend, store, drain_delay=f"{int(DRAIN_DELAY * 1000)}ms", grace="5s")
    # the checkouts are held in the payment upstream, then captured, while the sidecar drains
    sim.set_faults("payment", {"latency": {"dist": "fixed", "ms": 800}})
    sidecar = await SidecarProcess(path).start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            slow = [
                asyncio.create_task(status_of(http, f"{sidecar.listen}/slow/slow"))
                for _ in range(10)
            ]
            checkouts = [asyncio.create_task(checkout(http, sidecar.listen)) for _ in range(3)]
            await backend.wait_for(10)
            await asyncio.wait_for(sim.wait_for_hits("payment", 3), 10)

            signalled = time.monotonic()
            sidecar.signal(signal.SIGTERM)

            not_ready = await wait_not_ready(sidecar.admin)
            assert not_ready - signalled < DRAIN_DELAY, "readyz turns 503 at once"
            # during the drain delay the listener still takes new connections ...
            assert await fresh_connection_status(f"{sidecar.listen}/slow/fast") == 200

            # ... then stops taking them, while the requests in flight go on
            async def refused_now() -> bool:
                return await fresh_connection_status(f"{sidecar.listen}/slow/fast") is None

            await until(refused_now)
            refused = time.monotonic()
            assert refused - signalled >= DRAIN_DELAY
            assert not all(task.done() for task in slow), "the slow requests are still running"
            status, _ = await status_of(http, f"{sidecar.admin}/readyz")
            assert status == 503, "the admin listener answers through the grace period"

            assert [await task for task in slow] == [(200, {"slow": True})] * 10
            answers = [await task for task in checkouts]
            assert [(code, body["decision"]) for code, body in answers] == [(200, "confirmed")] * 3

        assert await sidecar.wait(5 + DRAIN_DELAY + 2) == 0, sidecar.stderr.read_text()
    finally:
        await sidecar.kill()

    assert sidecar.events("shutdown") and sidecar.events("shutdown_complete")
    assert sidecar.events("shutdown_forced") == []
    journal = await open_journal(store)
    try:
        assert await journal.unfinished(older_than=0) == []
    finally:
        await journal.close()


async def test_a_second_sigterm_exits_at_once(
    tmp_path: Path, sim: Simulator, backend: Backend
) -> None:
    path = tmp_path / "sidecar.yaml"
    store = f"sqlite://{tmp_path}/state.db"
    write_config(path, sim, backend, store, drain_delay="100ms", grace="10s")
    sidecar = await SidecarProcess(path).start()
    try:
        async with aiohttp.ClientSession() as http:
            hanging = [
                asyncio.create_task(status_of(http, f"{sidecar.listen}/slow/hang"))
                for _ in range(3)
            ]
            await backend.wait_for(3)
            sidecar.signal(signal.SIGTERM)
            await wait_not_ready(sidecar.admin)
            second = time.monotonic()
            sidecar.signal(signal.SIGTERM)

            code = await sidecar.wait(10)
            assert time.monotonic() - second < 2.0, "a second signal does not wait for the grace"
            assert code != 0
            await asyncio.gather(*hanging, return_exceptions=True)
        assert sidecar.events("shutdown_forced")
    finally:
        await sidecar.kill()


async def test_the_grace_running_out_exits_without_waiting_for_hung_requests(
    tmp_path: Path, sim: Simulator, backend: Backend
) -> None:
    path = tmp_path / "sidecar.yaml"
    store = f"sqlite://{tmp_path}/state.db"
    write_config(path, sim, backend, store, drain_delay="100ms", grace="1s")
    sidecar = await SidecarProcess(path).start()
    try:
        async with aiohttp.ClientSession() as http:
            hanging = [
                asyncio.create_task(status_of(http, f"{sidecar.listen}/slow/hang"))
                for _ in range(3)
            ]
            await backend.wait_for(3)
            signalled = time.monotonic()
            sidecar.signal(signal.SIGTERM)

            await sidecar.wait(10)
            took = time.monotonic() - signalled
            assert 1.0 <= took < 0.1 + 1.0 + 1.0 + 1.5, took  # drain + grace + the forced exit
            results = await asyncio.gather(*hanging, return_exceptions=True)
            assert all(isinstance(r, aiohttp.ClientError) for r in results), results
    finally:
        await sidecar.kill()


async def test_a_checkout_cut_off_by_a_forced_exit_is_finished_by_recovery_after_restart(
    tmp_path: Path, sim: Simulator, backend: Backend
) -> None:
    store = f"sqlite://{tmp_path}/state.db"
    first = tmp_path / "first.yaml"
    data = write_config(first, sim, backend, store, drain_delay="100ms", grace="10s")
    data["upstreams"]["payment"]["timeout"] = {"per_try": "8s", "total": "8s"}
    data["composite"]["checkout"].update(deadline="9s", reserve="500ms")
    first.write_text(yaml.safe_dump(data, sort_keys=False))
    sim.set_faults("payment", {"hang_rate": 1.0})
    sidecar = await SidecarProcess(first).start()
    try:
        async with aiohttp.ClientSession() as http:
            cut_off = asyncio.create_task(checkout(http, sidecar.listen))
            await asyncio.wait_for(sim.wait_for_hits("payment", 1), 10)
            sidecar.signal(signal.SIGTERM)
            await wait_not_ready(sidecar.admin)
            sidecar.signal(signal.SIGTERM)
            assert await sidecar.wait(5) != 0
            (answer,) = await asyncio.gather(cut_off, return_exceptions=True)
            assert isinstance(answer, aiohttp.ClientError), "the client saw the connection go"
    finally:
        await sidecar.kill()
    journal = await open_journal(store)
    try:
        assert len(await journal.unfinished(older_than=0)) == 1, "the journal kept the checkout"

        # restarted (with a short deadline, so recovery takes the checkout up soon)
        sim.set_faults("payment", {})
        second = tmp_path / "second.yaml"
        data = write_config(second, sim, backend, store, drain_delay="50ms", grace="2s")
        data["composite"]["checkout"].update(
            deadline="1s", reserve="300ms", recovery_interval="200ms"
        )
        second.write_text(yaml.safe_dump(data, sort_keys=False))
        restarted = await SidecarProcess(second).start()
        try:

            async def recovered() -> bool:
                return not await journal.unfinished(older_than=0)

            await until(recovered, seconds=15)
            restarted.signal(signal.SIGTERM)
            assert await restarted.wait(5) == 0, restarted.stderr.read_text()
        finally:
            await restarted.kill()
    finally:
        await journal.close()
    ledger = sim.ledger.snapshot()
    assert [a["status"] for a in ledger["authorizations"].values()] in ([], ["voided"])
    assert [r["status"] for r in ledger["reservations"].values()] == ["released"]
