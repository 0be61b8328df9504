"""Deadlines, per-try timeouts and retries, against real loopback upstreams."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web


class Script:
    """An upstream whose answers are scripted per request and whose hits are counted."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.hits = 0
        self.bodies: list[bytes] = []
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.hits += 1
            self.bodies.append(await request.read())
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            if answer == "hang":
                await self.release.wait()
                return web.Response(text="late")
            if answer == "reset":
                assert request.transport is not None
                request.transport.abort()
                return web.Response(text="never sent")
            if answer.startswith("retry-after:"):
                _, seconds, code = answer.split(":")
                return web.json_response(
                    {"busy": True}, status=int(code), headers={"Retry-After": seconds}
                )
            return web.json_response({"answer": answer, "hit": self.hits}, status=int(answer))

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


@pytest.fixture
async def through(start_server, start_sidecar):
    """Start a scripted upstream and a sidecar in front of it; returns (client, base, script)."""
    sessions: list[aiohttp.ClientSession] = []

    async def make(script: Script, **policy):
        server = await start_server(script.app())
        policy.setdefault("retry", {}).setdefault("backoff", {"base": "10ms", "max": "50ms"})
        upstream = {"url": str(server.make_url("")).rstrip("/"), **policy}
        _, base = await start_sidecar({"upstreams": {"payment": upstream}})
        session = aiohttp.ClientSession()
        sessions.append(session)
        return session, f"{base}/payment"

    yield make
    script_release = [s.close() for s in sessions]
    await asyncio.gather(*script_release)


async def test_failing_twice_then_succeeding_gives_200_after_three_attempts(through) -> None:
    script = Script("503", "502", "200")
    client, url = await through(script)
    async with client.get(f"{url}/charge") as response:
        assert response.status == 200
        assert response.headers["X-Sidecar-Attempts"] == "3"
        assert (await response.json())["hit"] == 3
    assert script.hits == 3


async def test_a_post_without_idempotency_key_is_tried_once(through) -> None:
    script = Script("503", "200")
    client, url = await through(script)
    async with client.post(f"{url}/authorize", json={"amount": 1}) as response:
        assert response.status == 503
        assert response.headers["X-Sidecar-Attempts"] == "1"
    assert script.hits == 1


async def test_a_post_with_idempotency_key_is_retried_with_the_same_body(through) -> None:
    script = Script("503", "200")
    client, url = await through(script)
    headers = {"Idempotency-Key": "k-1"}
    async with client.post(f"{url}/authorize", json={"amount": 1}, headers=headers) as response:
        assert response.status == 200
    assert script.hits == 2
    assert script.bodies[0] == script.bodies[1] == b'{"amount": 1}'


async def test_a_body_over_the_buffer_limit_is_streamed_and_not_retried(through) -> None:
    script = Script("503", "200")
    client, url = await through(script, retry={"buffer_limit": "1KiB"})

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"b" * 1024

    headers = {"Idempotency-Key": "k-2"}
    async with client.put(f"{url}/doc", data=chunks(), headers=headers) as response:
        assert response.status == 503
    assert script.hits == 1
    assert len(script.bodies[0]) == 8 * 1024


async def test_last_upstream_5xx_is_passed_through_after_retries(through) -> None:
    script = Script("503")
    client, url = await through(script)
    async with client.get(f"{url}/x") as response:
        assert response.status == 503
        assert response.headers["X-Sidecar-Attempts"] == "3"
        assert (await response.json())["answer"] == "503"
    assert script.hits == 3


async def test_a_hanging_upstream_is_answered_within_the_deadline(through) -> None:
    script = Script("hang")
    client, url = await through(script, timeout={"per_try": "200ms", "total": "500ms"})
    started = time.monotonic()
    try:
        async with client.get(f"{url}/slow") as response:
            elapsed = time.monotonic() - started
            assert response.status == 504
            body = await response.json()
    finally:
        script.release.set()
    assert body["reason"] == "timeout"
    assert body["upstream"] == "payment"
    assert body["attempts"] >= 2  # per-try timeouts were retried inside the deadline
    assert elapsed < 0.5 + 0.4  # generous margin for a shared machine


async def test_the_callers_own_timeout_shortens_the_deadline(through) -> None:
    script = Script("hang")
    client, url = await through(script, timeout={"per_try": "2s", "total": "5s"})
    started = time.monotonic()
    try:
        headers = {"X-Request-Timeout-Ms": "150"}
        async with client.get(f"{url}/slow", headers=headers) as response:
            assert response.status == 504
    finally:
        script.release.set()
    assert time.monotonic() - started < 0.15 + 0.5


async def test_retry_after_is_honoured_when_it_fits_the_deadline(through) -> None:
    script = Script("retry-after:1:503", "200")
    client, url = await through(script, timeout={"per_try": "1s", "total": "3s"})
    started = time.monotonic()
    async with client.get(f"{url}/x") as response:
        assert response.status == 200
    assert time.monotonic() - started >= 0.95
    assert script.hits == 2


async def test_retry_after_beyond_the_deadline_is_not_waited_for(through) -> None:
    script = Script("retry-after:30:503", "200")
    client, url = await through(script, timeout={"per_try": "1s", "total": "2s"})
    started = time.monotonic()
    async with client.get(f"{url}/x") as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "30"
    assert time.monotonic() - started < 1.0
    assert script.hits == 1


async def test_429_is_retried_after_retry_after_when_configured(through) -> None:
    script = Script("retry-after:0:429", "200")
    client, url = await through(script, retry={"on": [429, 503]})
    async with client.get(f"{url}/x") as response:
        assert response.status == 200
    assert script.hits == 2


async def test_a_reset_connection_is_retried_then_reported_as_json_502(through) -> None:
    script = Script("reset")
    client, url = await through(script)
    async with client.get(f"{url}/x") as response:
        assert response.status == 502
        body = await response.json()
    assert body["reason"] == "reset"
    assert body["attempts"] == 3
    assert script.hits == 3


async def test_a_reset_then_success_recovers(through) -> None:
    script = Script("reset", "200")
    client, url = await through(script)
    async with client.get(f"{url}/x") as response:
        assert response.status == 200
        assert response.headers["X-Sidecar-Attempts"] == "2"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_connect_failure_is_a_json_502(start_sidecar) -> None:
    port = _closed_port()
    upstream = {"url": f"http://127.0.0.1:{port}", "retry": {"backoff": {"base": "10ms"}}}
    _, base = await start_sidecar({"upstreams": {"fraud": upstream}})
    async with aiohttp.ClientSession() as client, client.get(f"{base}/fraud/score") as response:
        assert response.status == 502
        body = await response.json()
    assert body == {
        "error": body["error"],
        "reason": "connect_failure",
        "upstream": "fraud",
        "attempts": 3,
    }
    assert body["error"].startswith("could not connect to upstream")


async def test_retries_never_outlast_the_deadline(through) -> None:
    script = Script("503")
    client, url = await through(
        script,
        timeout={"per_try": "300ms", "total": "300ms"},
        retry={"attempts": 10, "backoff": {"base": "100ms", "max": "100ms", "jitter": "none"}},
    )
    started = time.monotonic()
    async with client.get(f"{url}/x") as response:
        assert response.status == 503
        attempts = int(response.headers["X-Sidecar-Attempts"])
    assert time.monotonic() - started < 0.3 + 0.4
    assert attempts <= 3  # 100 ms apart inside 300 ms
