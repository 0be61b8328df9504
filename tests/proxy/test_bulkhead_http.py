"""The bulkhead seen from the app: calls held in a hanging upstream, the next one refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web


class HoldingUpstream:
    """Holds every request until `release` is set, and counts arrivals."""

    def __init__(self) -> None:
        self.hits = 0
        self.release = asyncio.Event()
        self._arrivals = asyncio.Condition()

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.hits += 1
            async with self._arrivals:
                self._arrivals.notify_all()
            await self.release.wait()
            return web.json_response({"from": "upstream"})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    async def arrived(self, count: int) -> None:
        async with asyncio.timeout(5), self._arrivals:
            await self._arrivals.wait_for(lambda: self.hits >= count)


async def until(condition: Callable[[], bool], within: float = 5.0, every: float = 0.005) -> None:
    """Poll `condition` (sidecar state with no event to wait on) for at most `within` s."""
    for _ in range(int(within / every)):
        if condition():
            return
        await asyncio.sleep(every)
    raise AssertionError(f"still not true after {within}s")


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # no client-side connection cap: the sidecar's bulkhead is what is under test
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


@pytest.fixture
async def held(start_server, start_sidecar, client):
    """A sidecar in front of a holding upstream; yields a maker and releases on teardown."""
    upstreams: list[HoldingUpstream] = []

    async def make(**bulkhead):
        upstream = HoldingUpstream()
        upstreams.append(upstream)
        server = await start_server(upstream.app())
        config = {
            "url": str(server.make_url("")).rstrip("/"),
            "bulkhead": bulkhead,
            # 100 connections at once on a busy CI machine can take longer than the
            # default 250 ms connect timeout, and a breaker opened by those connect
            # failures would refuse the call under test: neither is what this tests
            "timeout": {"connect": "5s", "per_try": "10s", "total": "10s"},
            "breaker": {"enabled": False},
        }
        sidecar, base = await start_sidecar({"upstreams": {"inventory": config}})
        return sidecar, upstream, f"{base}/inventory/reserve"

    yield make
    for upstream in upstreams:
        upstream.release.set()


async def _get(client: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with client.get(url) as response:
        return response.status, await response.json()


async def test_the_call_past_max_concurrent_is_refused_at_once_with_json_503(held, client) -> None:
    _, upstream, url = await held(max_concurrent=100)
    calls = [asyncio.create_task(_get(client, url)) for _ in range(100)]
    await upstream.arrived(100)

    started = time.monotonic()
    status, body = await _get(client, url)
    assert time.monotonic() - started < 1.0  # refused, not queued until the deadline
    assert status == 503
    assert body["reason"] == "bulkhead_full"
    assert body["upstream"] == "inventory"
    assert body["attempts"] == 0
    assert upstream.hits == 100

    upstream.release.set()
    assert [status for status, _ in await asyncio.gather(*calls)] == [200] * 100


async def test_held_calls_all_complete_and_free_their_slots(held, client) -> None:
    sidecar, upstream, url = await held(max_concurrent=100)
    calls = [asyncio.create_task(_get(client, url)) for _ in range(100)]
    await upstream.arrived(100)
    bulkhead = sidecar.runtime.upstreams.get("inventory").policies.bulkhead
    assert bulkhead.in_flight == 100

    upstream.release.set()
    assert [status for status, _ in await asyncio.gather(*calls)] == [200] * 100
    await until(lambda: bulkhead.in_flight == 0)
    assert (await _get(client, url))[0] == 200


async def test_with_max_queue_the_next_call_waits_and_succeeds_when_a_slot_frees(
    held, client
) -> None:
    sidecar, upstream, url = await held(max_concurrent=100, max_queue=1)
    calls = [asyncio.create_task(_get(client, url)) for _ in range(100)]
    await upstream.arrived(100)
    bulkhead = sidecar.runtime.upstreams.get("inventory").policies.bulkhead

    waiting = asyncio.create_task(_get(client, url))
    await until(lambda: bulkhead.queued == 1)
    assert upstream.hits == 100  # queued in the sidecar, not sent

    upstream.release.set()
    assert (await waiting)[0] == 200
    assert upstream.hits == 101
    assert [status for status, _ in await asyncio.gather(*calls)] == [200] * 100


async def test_with_a_full_queue_the_next_call_is_refused(held, client) -> None:
    sidecar, upstream, url = await held(max_concurrent=2, max_queue=1)
    calls = [asyncio.create_task(_get(client, url)) for _ in range(2)]
    await upstream.arrived(2)
    bulkhead = sidecar.runtime.upstreams.get("inventory").policies.bulkhead
    waiting = asyncio.create_task(_get(client, url))
    await until(lambda: bulkhead.queued == 1)

    status, body = await _get(client, url)
    assert (status, body["reason"]) == (503, "bulkhead_full")

    upstream.release.set()
    assert [s for s, _ in await asyncio.gather(*calls, waiting)] == [200, 200, 200]
