"""One behavioural suite, every backend: each test taking `queue_url` runs once on
SQLite, once on a real Redis (under a fresh key prefix, deleted afterwards) and once on
a real PostgreSQL (in a fresh schema, dropped afterwards)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from proxy.jobs import JobQueue
from proxy.resilience.clock import FakeClock
from proxy.storage.open import open_queue
from tests.postgres import fresh_schema, schema_url

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def wall() -> FakeClock:
    """Fake wall-clock time, so retries fall due and leases expire without sleeping."""
    return FakeClock(start=1_700_000_000.0)


@pytest.fixture(params=["sqlite", "redis", "postgresql"])
async def queue_url(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/q.db"
        return
    if request.param == "postgresql":
        async with fresh_schema() as schema:
            yield schema_url(schema)
        return
    prefix = f"test-jobs-{uuid.uuid4().hex}:"
    yield f"{REDIS_URL}?prefix={prefix}"
    client = redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def queue(queue_url: str, wall: FakeClock) -> AsyncIterator[JobQueue]:
    opened = await open_queue(queue_url, wall=wall)
    try:
        yield opened
    finally:
        await opened.close()
