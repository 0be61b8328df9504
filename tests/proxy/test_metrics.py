"""Prometheus metrics after a scripted run, scraped over HTTP from the admin listener."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families


class PathScriptedUpstream:
    """Answers by path: `/ok` 200, `/fail` 500, `/flaky` 503 once then 200, `/hold` waits."""

    def __init__(self) -> None:
        self.flaky_calls = 0
        self.held = 0
        self.release = asyncio.Event()
        self._arrivals = asyncio.Condition()

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            path = request.path
            if path == "/hold":
                self.held += 1
                async with self._arrivals:
                    self._arrivals.notify_all()
                await self.release.wait()
            if path == "/fail":
                return web.json_response({}, status=500)
            if path == "/flaky":
                self.flaky_calls += 1
                if self.flaky_calls == 1:
                    return web.json_response({}, status=503)
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app

    async def arrived(self, count: int) -> None:
        async with asyncio.timeout(5), self._arrivals:
            await self._arrivals.wait_for(lambda: self.held >= count)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def sidecar_and_upstream(start_server, start_sidecar):
    """payment: trips after 2 failures, no retries; shipping: retries, static fallback."""
    upstream = PathScriptedUpstream()
    server = await start_server(upstream.app())
    url = str(server.make_url("")).rstrip("/")
    config = {
        "upstreams": {
            "payment": {
                "url": url,
                "retry": {"attempts": 1},
                "breaker": {"min_calls": 2, "failure_rate": 0.5, "open_for": "1m"},
            },
            "shipping": {
                "url": url,
                "retry": {"attempts": 3, "backoff": {"base": "1ms", "max": "5ms"}},
                "fallback": {"status": 200, "json": {"service": "standard", "price": 0}},
            },
        }
    }
    sidecar, base = await start_sidecar(config)
    yield sidecar, base, upstream
    upstream.release.set()


async def scrape(start_server, client: aiohttp.ClientSession, sidecar) -> Samples:
    server = await start_server(sidecar.build_admin_app())
    async with client.get(server.make_url("/metrics")) as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def _scripted_run(client: aiohttp.ClientSession, base: str) -> None:
    expected = [
        ("shipping/ok", 200, None),
        ("shipping/ok?q=1", 200, None),
        ("shipping/flaky", 200, None),  # 503, retried, then 200
        ("shipping/fail", 200, "upstream_5xx"),  # 500 answered by the static fallback
        ("payment/fail", 500, None),
        ("payment/fail", 500, None),  # the breaker opens here
        ("payment/ok", 503, None),  # refused: circuit_open
    ]
    for path, status, fallback in expected:
        async with client.get(f"{base}/{path}") as response:
            await response.read()
            assert response.status == status, path
            assert response.headers.get("X-Sidecar-Fallback") == fallback, path


async def test_request_counts_by_upstream_and_outcome(
    sidecar_and_upstream, start_server, client
) -> None:
    sidecar, base, _ = sidecar_and_upstream
    await _scripted_run(client, base)
    samples = await scrape(start_server, client, sidecar)

    counts = {
        (upstream, outcome): value(
            samples, "sidecar_requests_total", upstream=upstream, outcome=outcome
        )
        for upstream in ("payment", "shipping")
        for outcome in ("ok", "error", "timeout", "circuit_open", "bulkhead_full", "fallback")
    }
    assert {key: count for key, count in counts.items() if count} == {
        ("shipping", "ok"): 3,
        ("shipping", "fallback"): 1,
        ("payment", "error"): 2,
        ("payment", "circuit_open"): 1,
    }


async def test_attempts_retries_and_fallbacks_are_counted(
    sidecar_and_upstream, start_server, client
) -> None:
    sidecar, base, _ = sidecar_and_upstream
    await _scripted_run(client, base)
    samples = await scrape(start_server, client, sidecar)

    attempts = {
        labels: count
        for (name, labels), count in samples.items()
        if name == "sidecar_attempts_total" and count  # series made ready at 0 are not events
    }
    assert attempts == {
        frozenset({("upstream", "shipping"), ("result", "ok")}): 3,
        frozenset({("upstream", "shipping"), ("result", "upstream_5xx")}): 2,
        frozenset({("upstream", "payment"), ("result", "upstream_5xx")}): 2,
    }
    retries = {
        labels: count
        for (name, labels), count in samples.items()
        if name == "sidecar_retries_total" and count  # series made ready at 0 are not events
    }
    assert retries == {frozenset({("upstream", "shipping"), ("reason", "status_503")}): 1}
    fallbacks = {
        labels: count
        for (name, labels), count in samples.items()
        if name == "sidecar_fallbacks_total" and count  # series made ready at 0 are not events
    }
    assert fallbacks == {
        frozenset({("upstream", "shipping"), ("reason", "upstream_5xx"), ("source", "static")}): 1
    }


async def test_breaker_state_and_transitions_are_exported(
    sidecar_and_upstream, start_server, client
) -> None:
    sidecar, base, _ = sidecar_and_upstream
    await _scripted_run(client, base)
    samples = await scrape(start_server, client, sidecar)

    assert value(samples, "sidecar_breaker_state", upstream="payment", state="open") == 1
    assert value(samples, "sidecar_breaker_state", upstream="payment", state="closed") == 0
    assert value(samples, "sidecar_breaker_state", upstream="payment", state="half_open") == 0
    assert value(samples, "sidecar_breaker_state", upstream="shipping", state="closed") == 1
    transitions = {
        labels: count
        for (name, labels), count in samples.items()
        if name == "sidecar_breaker_transitions_total" and count
    }
    assert transitions == {
        frozenset({("upstream", "payment"), ("from_state", "closed"), ("to_state", "open")}): 1
    }
    assert value(samples, "sidecar_breaker_failure_rate", upstream="payment") == 1.0


async def test_latency_histogram_counts_every_finished_call(
    sidecar_and_upstream, start_server, client
) -> None:
    sidecar, base, _ = sidecar_and_upstream
    await _scripted_run(client, base)
    samples = await scrape(start_server, client, sidecar)

    name = "sidecar_request_duration_seconds"
    assert value(samples, f"{name}_count", upstream="shipping") == 4
    assert value(samples, f"{name}_count", upstream="payment") == 3
    assert value(samples, f"{name}_bucket", upstream="payment", le="+Inf") == 3
    assert value(samples, f"{name}_sum", upstream="payment") > 0


async def test_bulkhead_in_flight_counts_held_calls_and_returns_to_zero(
    sidecar_and_upstream, start_server, client
) -> None:
    sidecar, base, upstream = sidecar_and_upstream
    held = [asyncio.create_task(client.get(f"{base}/shipping/hold")) for _ in range(3)]
    try:
        await upstream.arrived(3)
        during = await scrape(start_server, client, sidecar)
    finally:
        upstream.release.set()
    for response in await asyncio.gather(*held):
        assert response.status == 200
        response.release()
    after = await scrape(start_server, client, sidecar)

    assert value(during, "sidecar_bulkhead_in_flight", upstream="shipping") == 3
    assert value(during, "sidecar_bulkhead_in_flight", upstream="payment") == 0
    assert value(after, "sidecar_bulkhead_in_flight", upstream="shipping") == 0
    assert value(after, "sidecar_bulkhead_queued", upstream="shipping") == 0


async def test_no_label_value_is_a_request_path(sidecar_and_upstream, start_server, client) -> None:
    sidecar, base, _ = sidecar_and_upstream
    await _scripted_run(client, base)
    samples = await scrape(start_server, client, sidecar)

    label_values = {v for _, labels in samples for _, v in labels}
    assert label_values  # the scrape did carry labels
    assert not [v for v in label_values if "/" in v]
