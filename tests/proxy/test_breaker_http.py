"""The circuit breaker seen from the app: real sockets, a counted upstream, a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from proxy.resilience.clock import FakeClock

BREAKER = {"min_calls": 5, "failure_rate": 0.5, "open_for": "1s", "half_open_probes": 2}
# The breaker runs on the fake clock, but an attempt's timeouts are the loop's own timers: on a
# loaded machine a held probe could time out (and reopen the breaker) before the second arrives.
# Outcomes here must come from the upstream's statuses alone.
LOOSE_TIMEOUTS = {"connect": "30s", "per_try": "60s", "total": "60s"}


class CountingUpstream:
    """Answers every request with `status` (held while `hold` is set) and counts the hits."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.hits = 0
        self.hold = False
        self.release = asyncio.Event()
        self._arrivals = asyncio.Condition()

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.hits += 1
            async with self._arrivals:
                self._arrivals.notify_all()
            if self.hold:
                await self.release.wait()
            return web.json_response({"from": "upstream"}, status=self.status)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    async def arrived(self, count: int) -> None:
        """Wait until `count` requests have reached this upstream."""
        async with asyncio.timeout(5), self._arrivals:
            await self._arrivals.wait_for(lambda: self.hits >= count)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def front(start_server, start_sidecar, fake_clock: FakeClock):
    """A sidecar on a fake clock in front of `upstream` as `payment`; returns (sidecar, url)."""

    async def make(upstream: CountingUpstream, **policy):
        server = await start_server(upstream.app())
        policy.setdefault("retry", {"attempts": 1})
        policy.setdefault("timeout", LOOSE_TIMEOUTS)
        config = {"url": str(server.make_url("")).rstrip("/"), **policy}
        sidecar, base = await start_sidecar({"upstreams": {"payment": config}}, clock=fake_clock)
        return sidecar, f"{base}/payment/charge"

    return make


async def _statuses(client: aiohttp.ClientSession, url: str, count: int) -> list[int]:
    statuses = []
    for _ in range(count):
        async with client.get(url) as response:
            statuses.append(response.status)
    return statuses


def _state(sidecar) -> str:
    return sidecar.runtime.upstreams.get("payment").policies.breaker.state


async def test_min_calls_failures_open_the_breaker_and_later_calls_make_no_upstream_hit(
    front, client
) -> None:
    upstream = CountingUpstream(500)
    sidecar, url = await front(upstream, breaker=BREAKER)

    assert await _statuses(client, url, 5) == [500] * 5
    assert _state(sidecar) == "open"
    assert await _statuses(client, url, 10) == [503] * 10
    assert upstream.hits == 5


async def test_a_refused_call_is_json_503_circuit_open_with_retry_after(front, client) -> None:
    upstream = CountingUpstream(500)
    _, url = await front(upstream, breaker=BREAKER)
    await _statuses(client, url, 5)

    async with client.get(url) as response:
        assert response.status == 503
        assert response.content_type == "application/json"
        assert response.headers["Retry-After"] == "1"
        body = await response.json()
    assert body["reason"] == "circuit_open"
    assert body["upstream"] == "payment"
    assert body["attempts"] == 0


async def test_successful_half_open_probes_close_the_breaker(front, client, fake_clock) -> None:
    upstream = CountingUpstream(500)
    sidecar, url = await front(upstream, breaker=BREAKER)
    await _statuses(client, url, 5)
    assert _state(sidecar) == "open"

    fake_clock.advance(1.0)
    upstream.status = 200
    assert _state(sidecar) == "half_open"
    assert await _statuses(client, url, 2) == [200, 200]  # half_open_probes: 2
    assert _state(sidecar) == "closed"
    assert await _statuses(client, url, 5) == [200] * 5
    assert upstream.hits == 5 + 2 + 5


async def test_half_open_lets_only_the_configured_probes_through(front, client, fake_clock) -> None:
    upstream = CountingUpstream(500)
    sidecar, url = await front(upstream, breaker=BREAKER)
    await _statuses(client, url, 5)
    fake_clock.advance(1.0)
    upstream.status, upstream.hold = 200, True

    async def get() -> int:
        async with client.get(url) as response:
            return response.status

    probes = [asyncio.create_task(get()) for _ in range(2)]
    try:
        await upstream.arrived(5 + 2)
        assert await get() == 503  # a third call while both probes are out
    finally:
        upstream.release.set()
    assert await asyncio.gather(*probes) == [200, 200]
    assert upstream.hits == 5 + 2
    assert _state(sidecar) == "closed"


async def test_a_failing_probe_reopens_the_breaker(front, client, fake_clock) -> None:
    upstream = CountingUpstream(500)
    sidecar, url = await front(upstream, breaker=BREAKER)
    await _statuses(client, url, 5)

    fake_clock.advance(1.0)
    assert await _statuses(client, url, 1) == [500]  # the probe reaches the upstream and fails
    assert _state(sidecar) == "open"
    assert await _statuses(client, url, 3) == [503] * 3
    assert upstream.hits == 5 + 1


async def test_breaker_does_not_half_open_before_open_for_has_passed(
    front, client, fake_clock
) -> None:
    upstream = CountingUpstream(500)
    _, url = await front(upstream, breaker=BREAKER)
    await _statuses(client, url, 5)

    fake_clock.advance(0.999)
    upstream.status = 200
    assert await _statuses(client, url, 1) == [503]
    assert upstream.hits == 5


async def test_4xx_answers_never_open_the_breaker(front, client) -> None:
    upstream = CountingUpstream(404)
    sidecar, url = await front(upstream, breaker=BREAKER)

    assert await _statuses(client, url, 20) == [404] * 20
    assert upstream.hits == 20
    assert _state(sidecar) == "closed"


async def test_a_disabled_breaker_never_refuses(front, client) -> None:
    upstream = CountingUpstream(500)
    sidecar, url = await front(upstream, breaker={**BREAKER, "enabled": False})

    assert await _statuses(client, url, 20) == [500] * 20
    assert upstream.hits == 20
    assert sidecar.runtime.upstreams.get("payment").policies.breaker is None


def chunked_503_upstream(size: int) -> tuple[web.Application, list[int]]:
    """Answers 503 with a `size`-byte chunked body: too large to be read before it is sent on."""
    hits = [0]

    async def handle(request: web.Request) -> web.StreamResponse:
        hits[0] += 1
        response = web.StreamResponse(status=503)
        await response.prepare(request)
        await response.write(b"x" * size)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app, hits


async def test_a_retry_refused_by_a_breaker_that_just_opened_passes_the_last_answer_whole(
    start_server, start_sidecar, client
) -> None:
    app, hits = chunked_503_upstream(100_000)
    server = await start_server(app)
    config = {
        "url": str(server.make_url("")).rstrip("/"),
        "breaker": {"min_calls": 1},  # this call's own 503 opens it
        "retry": {"attempts": 3, "backoff": {"base": "1ms", "max": "5ms"}},
    }
    _, base = await start_sidecar({"upstreams": {"inventory": config}})

    async with client.get(f"{base}/inventory/stock") as response:
        assert response.status == 503
        assert len(await response.read()) == 100_000
    assert hits[0] == 1
