"""Redis going away and coming back, with a redis-server of the test's own.

Fail closed while it is down (503 naming the store, nothing run), and recover
without rebuilding the store when it returns.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Awaitable, Callable, Iterator

import pytest

from proxy.storage.open import open_idempotency_store
from tests.stores import RedisServer, free_port

from .conftest import Harness


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    server = RedisServer(free_port())
    try:
        server.start()
        yield server
    finally:
        server.kill()


async def test_redis_outage_fails_closed_and_recovers_by_itself(
    own_redis: RedisServer, make_harness: Callable[..., Awaitable[Harness]]
) -> None:
    store = open_idempotency_store(
        f"redis://127.0.0.1:{own_redis.port}/0?prefix=outage-{uuid.uuid4().hex}:"
    )
    try:
        harness = await make_harness(store)
        assert (await harness.post("before"))[0] == 201

        own_redis.kill()
        status, headers, body = await harness.post("during")
        assert status == 503
        error = json.loads(body)
        assert error["reason"] == "store_unavailable"
        assert error["store"] == f"redis://127.0.0.1:{own_redis.port}/0"
        assert "Retry-After" in headers
        assert harness.upstream.calls == 1  # the request was not run unprotected

        own_redis.start()
        status, headers, _ = await harness.post("after")
        assert status == 201
        assert "Idempotent-Replayed" not in headers
        assert harness.upstream.calls == 2
        assert (await harness.post("after"))[1]["Idempotent-Replayed"] == "true"
        assert harness.results == ["first", "store_unavailable", "first", "replayed"]
    finally:
        await store.close()
