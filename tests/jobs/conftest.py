"""One behavioural suite, every backend: each test taking `queue_url` runs once on
SQLite, once on a real Redis (under a fresh key prefix, deleted afterwards) and once on
a real PostgreSQL (in a fresh schema, dropped afterwards) and a real RabbitMQ (under a
fresh queue-name prefix, its queues deleted afterwards)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
import redis.asyncio as redis

from proxy.jobs import JobQueue
from proxy.jobs.amqp_queue import queue_names
from proxy.resilience.clock import FakeClock
from proxy.storage.open import open_queue
from tests.postgres import fresh_schema, schema_url

REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


@pytest.fixture
def wall() -> FakeClock:
    """Fake wall-clock time, so retries fall due and leases expire without sleeping."""
    return FakeClock(start=1_700_000_000.0)


def broker_timed(queue_url: str) -> bool:
    """True for a backend whose delays run on the broker's own clock (RabbitMQ's
    message TTLs), which a FakeClock cannot advance: such tests have real-time
    twins in tests/jobs/test_amqp_queue.py."""
    return queue_url.startswith(("amqp://", "amqps://"))


def skip_if_broker_timed(queue_url: str) -> None:
    if broker_timed(queue_url):
        pytest.skip(
            "delays run on the broker's clock: see the real-time twin in test_amqp_queue.py"
        )


async def delete_amqp_queues(prefix: str) -> None:
    """Delete every queue `prefix` owns (missing ones are fine)."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        for name in queue_names(prefix):
            await channel.queue_delete(name)
    finally:
        await connection.close()


@pytest.fixture
async def amqp_url() -> AsyncIterator[str]:
    """A RabbitMQ queue URL under a fresh prefix; its queues are deleted afterwards."""
    prefix = f"test-jobs-{uuid.uuid4().hex}."
    # `name` labels the connections, so a test can close its own and no one else's
    yield f"{AMQP_URL}?prefix={prefix}&name={prefix}conn"
    await delete_amqp_queues(prefix)


@pytest.fixture(params=["sqlite", "redis", "postgresql", "amqp"])
async def queue_url(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/q.db"
        return
    if request.param == "postgresql":
        async with fresh_schema() as schema:
            yield schema_url(schema)
        return
    if request.param == "amqp":
        prefix = f"test-jobs-{uuid.uuid4().hex}."
        yield f"{AMQP_URL}?prefix={prefix}"
        await delete_amqp_queues(prefix)
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
