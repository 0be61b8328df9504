"""Fallbacks seen from the app: static and stale answers, marked with X-Sidecar-Fallback."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from proxy.resilience.clock import FakeClock

STANDARD = {"service": "standard", "price": 0}
STATIC = {"status": 200, "json": STANDARD}
FAST_RETRY = {"backoff": {"base": "1ms", "max": "5ms"}}


class ShippingUpstream:
    """Answers `status` with a body naming the path and query; hangs while `hang` is set."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.hang = False
        self.hits = 0
        self.release = asyncio.Event()
        self._arrivals = asyncio.Condition()

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.hits += 1
            async with self._arrivals:
                self._arrivals.notify_all()
            if self.hang:
                await self.release.wait()
            body = {"quote": request.path_qs, "status": self.status}
            return web.json_response(body, status=self.status)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    async def arrived(self, count: int) -> None:
        async with asyncio.timeout(5), self._arrivals:
            await self._arrivals.wait_for(lambda: self.hits >= count)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def front(start_server, start_sidecar, fake_clock: FakeClock):
    """A sidecar on a fake clock in front of a ShippingUpstream; returns (upstream, base url)."""
    upstreams: list[ShippingUpstream] = []

    async def make(fallback: dict, status: int = 200, **policy):
        upstream = ShippingUpstream(status)
        upstreams.append(upstream)
        server = await start_server(upstream.app())
        policy.setdefault("retry", FAST_RETRY)
        config = {"url": str(server.make_url("")).rstrip("/"), "fallback": fallback, **policy}
        _, base = await start_sidecar({"upstreams": {"shipping": config}}, clock=fake_clock)
        return upstream, f"{base}/shipping"

    yield make
    for upstream in upstreams:
        upstream.release.set()


async def _static_answer(response: aiohttp.ClientResponse, reason: str) -> None:
    assert response.status == 200
    assert response.headers["X-Sidecar-Fallback"] == reason
    assert response.headers.getall("Content-Type") == ["application/json"]
    assert "Age" not in response.headers
    assert json.loads(await response.read()) == STANDARD


# -- static ---------------------------------------------------------------------------


async def test_static_fallback_answers_an_upstream_500(front, client) -> None:
    _, url = await front(STATIC, status=500)
    async with client.get(f"{url}/quote") as response:
        await _static_answer(response, "upstream_5xx")


async def test_static_fallback_answers_a_timeout(front, client) -> None:
    upstream, url = await front(
        STATIC, timeout={"per_try": "100ms", "total": "300ms"}, retry={"attempts": 1}
    )
    upstream.hang = True
    async with client.get(f"{url}/quote") as response:
        await _static_answer(response, "timeout")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_static_fallback_answers_a_connect_failure(start_sidecar, client) -> None:
    config = {
        "url": f"http://127.0.0.1:{_closed_port()}",
        "fallback": STATIC,
        "retry": FAST_RETRY,
    }
    _, base = await start_sidecar({"upstreams": {"shipping": config}})
    async with client.get(f"{base}/shipping/quote") as response:
        await _static_answer(response, "connect_failure")
        assert response.headers["X-Sidecar-Attempts"] == "3"


async def test_static_fallback_answers_an_open_breaker_without_an_upstream_hit(
    front, client
) -> None:
    upstream, url = await front(STATIC, status=500, breaker={"min_calls": 1}, retry={"attempts": 1})
    async with client.get(f"{url}/quote") as response:  # the one failure that opens it
        await _static_answer(response, "upstream_5xx")
    async with client.get(f"{url}/quote") as response:
        await _static_answer(response, "circuit_open")
        assert response.headers["X-Sidecar-Attempts"] == "0"
    assert upstream.hits == 1


async def test_static_fallback_answers_a_full_bulkhead(front, client) -> None:
    upstream, url = await front(STATIC, bulkhead={"max_concurrent": 1})
    upstream.hang = True
    held = asyncio.create_task(client.get(f"{url}/quote"))
    try:
        await upstream.arrived(1)
        async with client.get(f"{url}/quote") as response:
            await _static_answer(response, "bulkhead_full")
    finally:
        upstream.release.set()
    async with await held as response:
        assert response.status == 200
        assert "X-Sidecar-Fallback" not in response.headers
    assert upstream.hits == 1


async def test_retries_exhausted_answers_when_the_5xx_itself_is_not_a_fallback_reason(
    front, client
) -> None:
    upstream, url = await front({**STATIC, "on": ["retries_exhausted"]}, status=503)
    async with client.get(f"{url}/quote") as response:
        await _static_answer(response, "retries_exhausted")
        assert response.headers["X-Sidecar-Attempts"] == "3"
    assert upstream.hits == 3


async def test_a_fallback_only_on_timeout_lets_a_500_pass_through(front, client) -> None:
    _, url = await front({**STATIC, "on": ["timeout"]}, status=500)
    async with client.get(f"{url}/quote") as response:
        assert response.status == 500
        assert "X-Sidecar-Fallback" not in response.headers
        assert (await response.json())["status"] == 500


async def test_a_4xx_is_never_answered_by_a_fallback(front, client) -> None:
    _, url = await front(STATIC, status=404)
    async with client.get(f"{url}/quote") as response:
        assert response.status == 404
        assert "X-Sidecar-Fallback" not in response.headers


# -- stale ----------------------------------------------------------------------------


async def test_stale_serves_the_last_good_get_for_the_same_path_and_query(
    front, client, fake_clock
) -> None:
    upstream, url = await front({"stale": True})
    async with client.get(f"{url}/quote?zip=10115") as response:
        assert response.status == 200
        good = await response.read()

    upstream.status = 500
    fake_clock.advance(7)
    async with client.get(f"{url}/quote?zip=10115") as response:
        assert response.status == 200
        assert response.headers["X-Sidecar-Fallback"] == "upstream_5xx"
        assert response.headers["Age"] == "7"
        assert response.headers.getall("Content-Type") == ["application/json; charset=utf-8"]
        assert await response.read() == good


async def test_stale_is_not_served_for_another_query(front, client) -> None:
    upstream, url = await front({"stale": True})
    async with client.get(f"{url}/quote?zip=10115") as response:
        assert response.status == 200

    upstream.status = 500
    async with client.get(f"{url}/quote?zip=80331") as response:
        assert response.status == 500  # the upstream's own answer, passed through
        assert "X-Sidecar-Fallback" not in response.headers
        assert (await response.json())["quote"] == "/quote?zip=80331"


async def test_stale_is_not_served_for_another_path(front, client) -> None:
    upstream, url = await front({"stale": True})
    async with client.get(f"{url}/quote") as response:
        assert response.status == 200

    upstream.status = 500
    async with client.get(f"{url}/rates") as response:
        assert response.status == 500
        assert "X-Sidecar-Fallback" not in response.headers


async def test_stale_entry_expires_after_max_age(front, client, fake_clock) -> None:
    upstream, url = await front({"stale": {"max_age": "10s"}})
    async with client.get(f"{url}/quote") as response:
        assert response.status == 200

    upstream.status = 500
    fake_clock.advance(11)
    async with client.get(f"{url}/quote") as response:
        assert response.status == 500
        assert "X-Sidecar-Fallback" not in response.headers


async def test_stale_first_then_static_when_there_is_no_entry(front, client) -> None:
    upstream, url = await front({"stale": True, **STATIC})
    async with client.get(f"{url}/quote?zip=10115") as response:
        assert response.status == 200

    upstream.status = 500
    async with client.get(f"{url}/quote?zip=10115") as response:
        assert response.headers["X-Sidecar-Fallback"] == "upstream_5xx"
        assert "Age" in response.headers
        assert (await response.json())["quote"] == "/quote?zip=10115"
    async with client.get(f"{url}/quote?zip=80331") as response:
        await _static_answer(response, "upstream_5xx")


async def test_a_post_is_never_answered_from_stale(front, client) -> None:
    upstream, url = await front({"stale": True})
    async with client.get(f"{url}/quote") as response:
        assert response.status == 200

    upstream.status = 500
    async with client.post(f"{url}/quote", json={"items": 1}) as response:
        assert response.status == 500
        assert "X-Sidecar-Fallback" not in response.headers
        assert (await response.json())["status"] == 500


async def test_a_post_answer_is_never_kept_for_a_later_get(front, client) -> None:
    upstream, url = await front({"stale": True})
    async with client.post(f"{url}/quote", json={"items": 1}) as response:
        assert response.status == 200

    upstream.status = 500
    async with client.get(f"{url}/quote") as response:
        assert response.status == 500
        assert "X-Sidecar-Fallback" not in response.headers


async def test_a_response_for_a_caller_with_credentials_is_never_served_stale(
    start_server, start_sidecar
) -> None:
    state = {"status": 200}

    async def profile(request: web.Request) -> web.Response:
        return web.json_response({"user": "alice"}, status=state["status"])

    app = web.Application()
    app.router.add_get("/me", profile)
    server = await start_server(app)
    upstream = {
        "url": str(server.make_url("")).rstrip("/"),
        "retry": {"attempts": 1},
        "fallback": {"stale": True},
    }
    _, base = await start_sidecar({"upstreams": {"accounts": upstream}})
    async with aiohttp.ClientSession() as client:
        headers = {"Authorization": "Bearer alice"}
        async with client.get(f"{base}/accounts/me", headers=headers) as response:
            assert response.status == 200
        state["status"] = 503
        async with client.get(f"{base}/accounts/me") as response:
            assert response.status == 503  # no one else gets alice's answer
            assert "X-Sidecar-Fallback" not in response.headers
