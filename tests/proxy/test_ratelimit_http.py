"""Rate limits seen from the app: real sockets, a counting upstream, real Redis.

The shared tests run two sidecars in this process on one Redis key (two replicas);
the store-down tests start their own redis-server (`tests.stores.RedisServer`) so
they can stop it without touching the shared one. Key prefixes are unique per test.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.app import Sidecar
from tests.conftest import StartServer
from tests.stores import RedisServer

REDIS_URL = "redis://127.0.0.1:6379/0"
StartSidecar = Callable[..., Awaitable[tuple[Sidecar, str]]]


class CountingUpstream:
    """Answers 200 and notes when each request arrived; `busy_for` answers one 429."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.busy_once: int | None = None  # Retry-After seconds of the next answer's 429

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.arrivals.append(time.monotonic())
            if self.busy_once is not None:
                seconds, self.busy_once = self.busy_once, None
                return web.json_response(
                    {"error": "quota"}, status=429, headers={"Retry-After": str(seconds)}
                )
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


async def redis_is_up() -> bool:
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


@pytest.fixture
async def shared_redis() -> AsyncIterator[str]:
    """The shared Redis, with a key prefix of this test's own (removed afterwards)."""
    if not await redis_is_up():
        pytest.skip(f"no Redis at {REDIS_URL}")
    prefix = f"test-ratelimit-{uuid.uuid4().hex}:"
    yield f"{REDIS_URL}?prefix={prefix}"
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


@pytest.fixture
async def upstream(start_server: StartServer) -> tuple[CountingUpstream, str]:
    counting = CountingUpstream()
    server = await start_server(counting.app())
    return counting, str(server.make_url("")).rstrip("/")


def sidecar_config(
    url: str, store: str | None = None, tmp: Any = None, **rate_limit: Any
) -> dict[str, Any]:
    """One upstream `payment` with `rate_limit`; the limiter's store is `store`, the
    durable stores stay local (memory and SQLite) so only the limiter uses Redis."""
    config: dict[str, Any] = {
        "upstreams": {
            "payment": {
                "url": url,
                "rate_limit": rate_limit,
                "timeout": {"per_try": "2s", "total": "3s"},
                "retry": {"attempts": 1},
                "idempotency": True,
            }
        }
    }
    if store is not None:
        config["store"] = store
        config["idempotency"] = {"store": "memory://"}
        config["queue"] = {"store": f"sqlite://{tmp}/queue-{uuid.uuid4().hex[:8]}.db"}
    return config


async def get(
    client: aiohttp.ClientSession, url: str, budget_ms: int | None = None
) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    headers = {"X-Request-Timeout-Ms": str(budget_ms)} if budget_ms is not None else {}
    async with client.get(url, headers=headers) as response:
        return response.status, await response.json(), response.headers


async def load(
    client: aiohttp.ClientSession, urls: list[str], seconds: float, per_url: int
) -> list[int]:
    """`per_url` callers per URL, each calling in a loop for `seconds`; their statuses."""
    statuses: list[int] = []
    stop = time.monotonic() + seconds

    async def caller(url: str) -> None:
        while time.monotonic() < stop:
            async with client.get(url) as response:
                await response.read()
                statuses.append(response.status)

    await asyncio.gather(*(caller(url) for url in urls for _ in range(per_url)))
    return statuses


def assert_rate_held(arrivals: list[float], rate: float, burst: int, seconds: float) -> None:
    """The upstream saw the rate (within 5%) over the middle of the run, and never more
    than burst + rate * t over any stretch t."""
    arrivals = sorted(arrivals)
    start = arrivals[0] + 0.5  # past the opening burst
    window = [t for t in arrivals if start <= t < start + seconds]
    assert abs(len(window) - rate * seconds) <= 0.05 * rate * seconds, len(window)
    for i in range(0, len(arrivals), 7):
        for j in range(i, len(arrivals)):
            # 20 ms of slack: arrival times carry the sidecar's and the loop's jitter
            assert j - i + 1 <= burst + rate * (arrivals[j] - arrivals[i] + 0.02) + 1


# -- local ------------------------------------------------------------------------------


async def test_a_burst_within_burst_passes_at_once_and_the_next_is_refused_with_429(
    start_sidecar: StartSidecar, client: aiohttp.ClientSession, upstream: Any
) -> None:
    counting, url = upstream
    _, base = await start_sidecar(sidecar_config(url, rate="1/s", burst=5))
    started = time.monotonic()
    answers = await asyncio.gather(*(get(client, f"{base}/payment/x") for _ in range(5)))
    assert [status for status, _, _ in answers] == [200] * 5
    assert time.monotonic() - started < 1.0

    status, body, headers = await get(client, f"{base}/payment/x", budget_ms=300)
    assert status == 429
    assert body["reason"] == "rate_limited" and body["upstream"] == "payment"
    assert body["attempts"] == 0
    assert headers["Retry-After"] == "1"
    assert headers["X-Sidecar-Error"] == "rate_limited"
    assert len(counting.arrivals) == 5  # the refused call never reached the upstream


async def test_a_call_over_the_limit_waits_for_its_token_when_its_deadline_allows(
    start_sidecar: StartSidecar, client: aiohttp.ClientSession, upstream: Any
) -> None:
    counting, url = upstream
    _, base = await start_sidecar(sidecar_config(url, rate="5/s", burst=1))
    assert (await get(client, f"{base}/payment/x"))[0] == 200
    started = time.monotonic()
    assert (await get(client, f"{base}/payment/x", budget_ms=2000))[0] == 200
    assert time.monotonic() - started >= 0.15
    assert counting.arrivals[1] - counting.arrivals[0] >= 0.18


async def test_a_keyed_post_refused_by_the_limit_gives_its_key_back(
    start_sidecar: StartSidecar, client: aiohttp.ClientSession, upstream: Any
) -> None:
    counting, url = upstream
    _, base = await start_sidecar(sidecar_config(url, rate="2/s", burst=1))
    assert (await get(client, f"{base}/payment/warm"))[0] == 200
    headers = {"Idempotency-Key": f"k-{uuid.uuid4().hex}", "X-Request-Timeout-Ms": "100"}
    async with client.post(f"{base}/payment/charge", json={"a": 1}, headers=headers) as refused:
        assert refused.status == 429
    await asyncio.sleep(0.5)
    async with client.post(f"{base}/payment/charge", json={"a": 1}, headers=headers) as again:
        assert again.status == 200  # it ran: not a replay of the 429, not "in progress"
        assert "Idempotent-Replayed" not in again.headers
    assert len(counting.arrivals) == 2


async def test_the_metrics_count_refusals_and_show_the_bucket(
    start_sidecar: StartSidecar, client: aiohttp.ClientSession, upstream: Any
) -> None:
    _, url = upstream
    sidecar, base = await start_sidecar(sidecar_config(url, rate="1/s", burst=2))
    for _ in range(3):
        await get(client, f"{base}/payment/x", budget_ms=100)
    registry = sidecar.metrics.registry
    labels = {"upstream": "payment", "scope": "local"}
    assert registry.get_sample_value("sidecar_rate_limited_total", labels) == 1.0
    tokens = registry.get_sample_value("sidecar_rate_limit_tokens", labels)
    assert tokens is not None and tokens < 0.5
    outcome = {"upstream": "payment", "outcome": "rate_limited"}
    assert registry.get_sample_value("sidecar_requests_total", outcome) == 1.0


@pytest.mark.slow
async def test_the_rate_holds_within_5_percent_over_10_s_in_one_process(
    start_sidecar: StartSidecar, client: aiohttp.ClientSession, upstream: Any
) -> None:
    counting, url = upstream
    _, base = await start_sidecar(sidecar_config(url, rate="40/s", burst=5))
    statuses = await load(client, [f"{base}/payment/x"], seconds=11.0, per_url=8)
    assert set(statuses) <= {200, 429}
    assert_rate_held(counting.arrivals, rate=40.0, burst=5, seconds=10.0)


# -- shared ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_the_rate_holds_within_5_percent_over_10_s_for_two_replicas_sharing_redis(
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
    upstream: Any,
    shared_redis: str,
    tmp_path: Any,
) -> None:
    counting, url = upstream
    config = sidecar_config(url, shared_redis, tmp_path, rate="40/s", burst=5, scope="shared")
    _, a = await start_sidecar(config)
    _, b = await start_sidecar(config)
    urls = [f"{a}/payment/x", f"{b}/payment/x"]
    statuses = await load(client, urls, seconds=11.0, per_url=4)
    assert set(statuses) <= {200, 429}
    assert_rate_held(counting.arrivals, rate=40.0, burst=5, seconds=10.0)


async def test_an_upstreams_429_with_retry_after_stops_calls_for_that_long_on_both_replicas(
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
    upstream: Any,
    shared_redis: str,
    tmp_path: Any,
) -> None:
    counting, url = upstream
    config = sidecar_config(url, shared_redis, tmp_path, rate="100/s", burst=10, scope="shared")
    _, a = await start_sidecar(config)
    _, b = await start_sidecar(config)
    counting.busy_once = 2
    status, body, _ = await get(client, f"{a}/payment/x")
    assert status == 429 and body == {"error": "quota"}  # the upstream's own, passed on
    paused_at = counting.arrivals[0]

    # both replicas ask in a loop with short budgets: refused by the sidecar, unsent
    refusals = 0
    while time.monotonic() < paused_at + 1.7:
        for base in (a, b):
            status, body, headers = await get(client, f"{base}/payment/x", budget_ms=200)
            assert status == 429 and body["reason"] == "rate_limited"
            assert 1 <= int(headers["Retry-After"]) <= 2
            refusals += 1
        await asyncio.sleep(0.05)
    assert len(counting.arrivals) == 1 and refusals >= 10

    # a call that can wait gets the first token after the pause, on the other replica
    status, _, _ = await get(client, f"{b}/payment/x", budget_ms=2500)
    assert status == 200
    assert counting.arrivals[1] - paused_at >= 1.95


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.remove)


@pytest.mark.parametrize(("action", "expected"), [("refuse", 503), ("allow", 200)])
async def test_a_shared_limit_fails_closed_when_its_store_is_down_unless_allowed(
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
    upstream: Any,
    own_redis: RedisServer,
    tmp_path: Any,
    action: str,
    expected: int,
) -> None:
    counting, url = upstream
    config = sidecar_config(
        url, own_redis.url, tmp_path, rate="100/s", burst=10, scope="shared", on_store_down=action
    )
    sidecar, base = await start_sidecar(config)
    assert (await get(client, f"{base}/payment/x"))[0] == 200  # the store is up
    await asyncio.to_thread(own_redis.kill)

    status, body, headers = await get(client, f"{base}/payment/x")
    assert status == expected
    if action == "refuse":
        assert body["reason"] == "store_unavailable" and body["attempts"] == 0
        assert "rate limit store unavailable" in body["error"]
        assert headers["Retry-After"] == "1"
        assert len(counting.arrivals) == 1
    else:
        assert len(counting.arrivals) == 2
    labels = {"upstream": "payment", "action": "refused" if action == "refuse" else "allowed"}
    errors = sidecar.metrics.registry.get_sample_value(
        "sidecar_rate_limit_store_errors_total", labels
    )
    assert errors == 1.0
