"""The retry budget under a storm: an upstream that always fails gets few extra calls."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from proxy.resilience.clock import FakeClock

REQUESTS = 200
CONCURRENCY = 20
RATIO, MIN_PER_SECOND, WINDOW = 0.2, 1, 10


def always_503() -> tuple[web.Application, list[int]]:
    hits = [0]

    async def handle(request: web.Request) -> web.Response:
        hits[0] += 1
        return web.json_response({"busy": True}, status=503)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app, hits


async def _storm(url: str) -> list[int]:
    """`REQUESTS` GETs, at most `CONCURRENCY` at a time; their statuses."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(client: aiohttp.ClientSession) -> int:
        async with gate, client.get(url) as response:
            await response.read()
            return response.status

    async with aiohttp.ClientSession() as client:
        return await asyncio.gather(*(one(client) for _ in range(REQUESTS)))


def _sample(registry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_a_retry_storm_is_capped_by_the_budget(start_server, start_sidecar) -> None:
    app, hits = always_503()
    server = await start_server(app)
    upstream = {
        "url": str(server.make_url("")).rstrip("/"),
        "retry": {
            "attempts": 3,
            "backoff": {"base": "1ms", "max": "5ms"},
            "budget": {"ratio": RATIO, "min_per_second": MIN_PER_SECOND, "window": f"{WINDOW}s"},
        },
        "breaker": {"enabled": False},
    }
    # a fake clock keeps the whole storm inside one budget window, however slow the machine
    sidecar, base = await start_sidecar({"upstreams": {"coupon": upstream}}, clock=FakeClock())

    statuses = await _storm(f"{base}/coupon/validate")

    assert statuses == [503] * REQUESTS
    allowance = RATIO * REQUESTS + MIN_PER_SECOND * WINDOW
    assert hits[0] <= REQUESTS + allowance
    assert hits[0] < REQUESTS * 3 / 2  # without a budget it would be REQUESTS * 3
    registry = sidecar.metrics.registry
    retries = _sample(registry, "sidecar_retries_total", upstream="coupon", reason="status_503")
    assert hits[0] == REQUESTS + retries
    refusals = _sample(registry, "sidecar_retry_budget_refusals_total", upstream="coupon")
    assert refusals > 0
    assert retries + refusals >= REQUESTS  # every request wanted a retry: it got one or was refused


async def test_a_quiet_upstream_still_retries_within_the_floor(start_server, start_sidecar) -> None:
    app, hits = always_503()
    server = await start_server(app)
    upstream = {
        "url": str(server.make_url("")).rstrip("/"),
        "retry": {
            "attempts": 3,
            "backoff": {"base": "1ms", "max": "5ms"},
            "budget": {"ratio": 0, "min_per_second": 0.2, "window": "10s"},
        },
    }
    sidecar, base = await start_sidecar({"upstreams": {"coupon": upstream}}, clock=FakeClock())

    async with aiohttp.ClientSession() as client:
        async with client.get(f"{base}/coupon/validate") as response:
            # the floor, 0.2/s x 10 s, pays for both retries of the first call
            assert response.headers["X-Sidecar-Attempts"] == "3"
        async with client.get(f"{base}/coupon/validate") as response:
            assert response.headers["X-Sidecar-Attempts"] == "1"  # the floor is spent
    assert hits[0] == 3 + 1
    refusals = sidecar.metrics.registry.get_sample_value(
        "sidecar_retry_budget_refusals_total", {"upstream": "coupon"}
    )
    assert refusals == 1
