"""The shared rate limit's stores answer alike: memory://, Redis and PostgreSQL, one contract.

Redis runs the GCRA as a Lua script on its own clock; these tests hold it to the
same answers as `TokenBucket` (which `MemoryBuckets` is), with real time and
generous bounds, and check that concurrent takers never get more than the burst.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from proxy.resilience.ratelimit import BucketStore, BucketStoreUnavailable, RateLimitOptions
from proxy.storage.limits import open_bucket_store
from tests.postgres import fresh_schema, schema_url
from tests.stores import free_port

REDIS_URL = "redis://127.0.0.1:6379/0"
OPTIONS = RateLimitOptions(rate=10.0, burst=5, scope="shared")
SLOW = RateLimitOptions(rate=1.0, burst=5, scope="shared")
"""One token a second: a busy machine's slow round trips refill next to nothing."""


async def _redis_is_up() -> bool:
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


@pytest.fixture(params=["memory", "redis", "postgresql"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[BucketStore]:
    if request.param == "postgresql":
        async with fresh_schema() as schema:
            opened = open_bucket_store(schema_url(schema))
            try:
                yield opened
            finally:
                await opened.close()
        return
    if request.param == "memory":
        opened = open_bucket_store("memory://")
    else:
        if not await _redis_is_up():
            pytest.skip(f"no Redis at {REDIS_URL}")
        opened = open_bucket_store(f"{REDIS_URL}?prefix=test-limits-{uuid.uuid4().hex}:")
    try:
        yield opened
    finally:
        await opened.close()


async def test_a_burst_is_granted_at_once_then_the_next_token_is_an_interval_away(
    store: BucketStore,
) -> None:
    answers = [await store.take("payment", SLOW, 0.0) for _ in range(5)]
    assert all(a.granted and a.wait == 0.0 for a in answers)
    assert answers[-1].level == pytest.approx(0.0, abs=0.15)  # a little refill meanwhile
    refused = await store.take("payment", SLOW, 0.01)
    assert not refused.granted
    assert 0.5 < refused.wait <= 1.0
    waited = await store.take("payment", SLOW, 1.0)
    assert waited.granted and 0.5 < waited.wait <= 1.0


async def test_buckets_are_per_key(store: BucketStore) -> None:
    for _ in range(5):
        await store.take("payment", OPTIONS, 0.0)
    assert (await store.take("coupon", OPTIONS, 0.0)).granted


async def test_a_pause_holds_every_taker_until_it_ends(store: BucketStore) -> None:
    await store.pause("payment", OPTIONS, 0.3)
    refused = await store.take("payment", OPTIONS, 0.1)
    assert not refused.granted and 0.2 < refused.wait <= 0.3
    await asyncio.sleep(0.32)
    assert (await store.take("payment", OPTIONS, 0.0)).granted
    assert not (await store.take("payment", OPTIONS, 0.0)).granted  # refills from empty


async def test_concurrent_takers_never_share_a_token(store: BucketStore) -> None:
    answers = await asyncio.gather(*(store.take("payment", SLOW, 0.0) for _ in range(40)))
    assert sum(a.granted for a in answers) == 5


async def test_an_unreachable_redis_is_unavailable_without_the_password() -> None:
    store = open_bucket_store(f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(BucketStoreUnavailable) as raised:
            await store.take("payment", OPTIONS, 1.0)
    finally:
        await store.close()
    assert "s3cret" not in str(raised.value)
    assert "***@127.0.0.1" in str(raised.value)  # named by its redacted URL


async def test_an_unreachable_postgresql_is_unavailable_without_the_password() -> None:
    store = open_bucket_store(f"postgresql://app:s3cret@127.0.0.1:{free_port()}/db")
    try:
        with pytest.raises(BucketStoreUnavailable) as raised:
            await store.take("payment", OPTIONS, 1.0)
    finally:
        await store.close()
    assert "s3cret" not in str(raised.value)


def test_a_store_that_cannot_share_a_limit_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"rate limit store URL 'sqlite:///x.db': sqlite://"):
        open_bucket_store("sqlite:///x.db")
