"""Fixtures: one store per backend (memory, SQLite file, real Redis, real PostgreSQL in a
schema of its own) and a tiny app.

The behavioural suite takes `backend` and so runs once per store URL. Time passes
through `Backend.pass_time`: a FakeClock jump for memory, SQLite and PostgreSQL, a bounded
poll on the condition for Redis (whose expiry is the server's own).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.idempotency import IdempotencyGuard, IdempotencyStore, StoredResponse
from proxy.resilience.clock import FakeClock
from proxy.storage.open import open_idempotency_store
from tests.postgres import fresh_schema, schema_url

REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass
class Backend:
    """How to open a store of one kind and how to let its records expire."""

    kind: str
    url: str
    clock: FakeClock | None
    short_ttl: float  # a TTL that tests can wait out

    def open(self) -> IdempotencyStore:
        return open_idempotency_store(self.url, clock=self.clock)

    async def pass_time(self, seconds: float, probe: Callable[[], Awaitable[bool]]) -> None:
        """Let `seconds` pass, then insist `probe()` turns true (bounded for Redis)."""
        if self.clock is not None:
            assert not await probe(), "condition held before the time passed"
            self.clock.advance(seconds + 0.001)
            assert await probe(), "condition did not hold after the time passed"
            return
        deadline = time.monotonic() + seconds + 5.0
        while not await probe():
            assert time.monotonic() < deadline, "condition never held"
            await asyncio.sleep(0.02)


async def _redis_reachable() -> bool:
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


@pytest.fixture(params=["memory", "sqlite", "redis", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Backend]:
    kind = request.param
    if kind == "memory":
        yield Backend(kind, "memory://", FakeClock(), short_ttl=30.0)
    elif kind == "sqlite":
        yield Backend(kind, f"sqlite://{tmp_path}/idempotency.db", FakeClock(time.time()), 30.0)
    elif kind == "postgresql":
        async with fresh_schema() as schema:
            yield Backend(kind, schema_url(schema), FakeClock(time.time()), 30.0)
    else:
        if not await _redis_reachable():
            pytest.skip(f"no Redis at {REDIS_URL}")
        prefix = f"test-{uuid.uuid4().hex}:"
        yield Backend(kind, f"{REDIS_URL}?prefix={prefix}", None, short_ttl=0.2)
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            async for name in client.scan_iter(match=f"{prefix}*"):
                await client.delete(name)
        finally:
            await client.aclose()


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[IdempotencyStore]:
    opened = backend.open()
    try:
        yield opened
    finally:
        await opened.close()


@dataclass
class Upstream:
    """Stands in for the real work: counts runs and can be held on an Event."""

    calls: int = 0
    status: int = 201
    hold: asyncio.Event | None = None
    delay: float = 0.0
    fail_next: bool = False
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, body: bytes) -> StoredResponse:
        self.calls += 1
        number = self.calls
        self.started.set()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("refused before reaching the upstream")
        if self.hold is not None:
            await self.hold.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        payload = {"order": number, "received": body.decode("utf-8", "replace")}
        return StoredResponse(
            self.status,
            [
                ("Content-Type", "application/json; charset=utf-8"),
                ("Location", f"/orders/{number}"),
                ("X-Not-Kept", f"run-{number}"),
            ],
            json.dumps(payload, indent=1).encode(),
        )


@dataclass
class Harness:
    client: TestClient
    upstream: Upstream
    guard: IdempotencyGuard
    results: list[str]

    async def post(
        self,
        key: str | None,
        body: Any = None,
        *,
        path: str = "/orders",
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        sent = dict(headers or {})
        if key is not None:
            sent["Idempotency-Key"] = key
        if raw is None:
            raw = json.dumps(body if body is not None else {"item": "book"}).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self.client.post(path, data=raw, headers=sent) as response:
            return response.status, dict(response.headers), await response.read()


@pytest.fixture
def make_harness(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
) -> Callable[..., Awaitable[Harness]]:
    """Build the app around a guard over `store`; routes /orders and /refunds."""

    async def build(store: IdempotencyStore, **guard_options: Any) -> Harness:
        upstream = Upstream()
        results: list[str] = []
        guard = IdempotencyGuard(store, on_result=results.append, **guard_options)

        def route(scope: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
            async def handler(request: web.Request) -> web.StreamResponse:
                body = await request.read()
                return await guard.handle(request, body, scope, lambda: upstream.run(body))

            return handler

        app = web.Application()
        app.router.add_post("/orders", route("orders"))
        app.router.add_post("/refunds", route("refunds"))
        client = await aiohttp_client(app)
        return Harness(client, upstream, guard, results)

    return build
