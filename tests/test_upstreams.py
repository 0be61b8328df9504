"""`Upstream.call`: the call finishes itself when its `async with` block ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.client import OutgoingRequest
from proxy.upstreams import Upstream, UpstreamHooks
from tests.conftest import make_config


class Recorder(UpstreamHooks):
    def __init__(self) -> None:
        self.finished: list[tuple[str, str]] = []
        self.fallbacks: list[str] = []

    def request_finished(self, upstream: str, outcome: str, seconds: float) -> None:
        self.finished.append((upstream, outcome))

    def fallback_served(self, upstream: str, reason: str, source: str) -> None:
        self.fallbacks.append(reason)


@pytest.fixture
async def base_url(start_server) -> str:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(64):
            await response.write(b"x" * 65536)
        return response

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/big", big)
    app.router.add_get("/fail", fail)
    server = await start_server(app)
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def upstream(base_url: str) -> AsyncIterator[tuple[Upstream, Recorder]]:
    config = make_config(
        {
            "upstreams": {
                "svc": {
                    "url": base_url,
                    "bulkhead": {"max_concurrent": 1},
                    "retry": {"attempts": 1},
                    "fallback": {"status": 200, "json": {"fallback": True}},
                }
            }
        }
    )
    hooks = Recorder()
    svc = Upstream("svc", config.upstreams["svc"], hooks=hooks)
    yield svc, hooks
    await svc.close()


def get(upstream: Upstream, path: str) -> OutgoingRequest:
    return OutgoingRequest("GET", URL(upstream.base_url + path), CIMultiDict())


async def test_the_bulkhead_slot_is_given_back_when_the_block_ends(upstream) -> None:
    svc, hooks = upstream
    async with svc.call(get(svc, "/ok"), svc.deadline(), retryable=True) as call:
        assert svc.policies.bulkhead.in_flight == 1
        assert call.response is not None and call.response.status == 200
    assert svc.policies.bulkhead.in_flight == 0
    assert hooks.finished == [("svc", "ok")]


async def test_a_caller_that_raises_inside_the_block_leaks_nothing(upstream) -> None:
    svc, hooks = upstream
    with pytest.raises(RuntimeError, match="caller bug"):
        async with svc.call(get(svc, "/big"), svc.deadline(), retryable=True) as call:
            assert call.response is not None and call.response.body is None  # unread
            raise RuntimeError("caller bug")
    assert svc.policies.bulkhead.in_flight == 0
    assert hooks.finished == [("svc", "ok")]
    # the unread body's connection was closed, not pooled: the next call still works
    async with svc.call(get(svc, "/ok"), svc.deadline(), retryable=True) as call:
        assert call.response is not None and await call.response.read() == b'{"ok": true}'


async def test_a_cancelled_caller_gives_the_slot_back(upstream) -> None:
    svc, _ = upstream
    entered = asyncio.Event()

    async def caller() -> None:
        async with svc.call(get(svc, "/ok"), svc.deadline(), retryable=True):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(caller())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert svc.policies.bulkhead.in_flight == 0


async def test_the_fallback_is_served_only_when_asked_for_and_counted_once(upstream) -> None:
    svc, hooks = upstream
    async with svc.call(get(svc, "/fail"), svc.deadline(), retryable=True) as call:
        assert call.fallback is None  # no fallback_key: the caller wants the failure
    async with svc.call(
        get(svc, "/fail"), svc.deadline(), retryable=True, fallback_key="/fail"
    ) as call:
        assert call.fallback is not None and call.fallback.reason == "upstream_5xx"
        assert call.fallback is call.fallback
    assert hooks.fallbacks == ["upstream_5xx"]
    assert hooks.finished == [("svc", "error"), ("svc", "fallback")]


async def test_a_raising_telemetry_hook_still_lets_go_of_the_slot_and_the_body(base_url) -> None:
    class Broken(UpstreamHooks):
        def request_finished(self, upstream: str, outcome: str, seconds: float) -> None:
            raise RuntimeError("telemetry bug")

    config = make_config({"upstreams": {"svc": {"url": base_url, "retry": {"attempts": 1}}}})
    svc = Upstream("svc", config.upstreams["svc"], hooks=Broken())
    try:
        with pytest.raises(RuntimeError, match="telemetry bug"):
            async with svc.call(get(svc, "/big"), svc.deadline(), retryable=True) as call:
                response = call.response
                assert response is not None and response.body is None  # unread
        assert svc.policies.bulkhead.in_flight == 0
    finally:
        await svc.close()
