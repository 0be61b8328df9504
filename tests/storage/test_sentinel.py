"""`redis+sentinel://`: the URL read apart, its passwords never shown, and every Redis
store opened through a real Sentinel (a master, a replica and a Sentinel of the test's
own) and following it to a new master after `SENTINEL FAILOVER`."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Iterator

import pytest

from proxy.checkout.journal import CheckoutRecord
from proxy.config.values import StoreUrl as StoreUrlField
from proxy.jobs import Job
from proxy.storage.errors import StoreUnavailable
from proxy.storage.open import (
    BACKENDS,
    open_idempotency_store,
    open_journal,
    open_queue,
    probe_durability,
)
from proxy.storage.sentinel import MASTER_CHECK_INTERVAL, SentinelTarget
from proxy.storage.url import SCHEMES, StoreUrl, redact_secrets, redact_url
from tests.conftest import make_config

from .redis_servers import MASTER_PASSWORD, SENTINEL_PASSWORD, SentinelSet, sentinel_set

URL = (
    "redis+sentinel://app:m-Secret@10.0.0.1:26379,10.0.0.2:26380,[::1]/mymaster/2"
    "?sentinel_password=s-Secret&prefix=p:&socket_timeout=0.5"
)


# -- the URL ----------------------------------------------------------------------------


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database() -> None:
    target = SentinelTarget.parse(StoreUrl.parse(URL, "job queue").client_url)
    assert target.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26379))
    assert (target.service, target.db) == ("mymaster", 2)
    assert target.socket_timeout == 0.5


def test_the_userinfo_is_the_masters_and_sentinel_password_the_sentinels() -> None:
    target = SentinelTarget.parse(StoreUrl.parse(URL, "job queue").client_url)
    assert (target.username, target.password) == ("app", "m-Secret")
    assert target.sentinel_password == "s-Secret"
    assert "Secret" not in repr(target)


def test_the_database_defaults_to_0() -> None:
    target = SentinelTarget.parse("redis+sentinel://h:1/svc")
    assert (target.sentinels, target.service, target.db) == ((("h", 1),), "svc", 0)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://:m-Secret@h:26379", "names no service"),
        ("redis+sentinel://:m-Secret@/svc/0", "names no Sentinel"),
        ("redis+sentinel://:m-Secret@h:port/svc/0", "malformed"),
        ("redis+sentinel://:m-Secret@h/svc/zero", "not a number"),
        ("redis+sentinel://:m-Secret@h/svc/0?sentinel_pasword=s-Secret", "unknown parameter"),
    ],
)
@pytest.mark.parametrize("kind", list(BACKENDS))
async def test_a_bad_sentinel_url_is_refused_naming_the_store_without_a_password(
    url: str, problem: str, kind: str
) -> None:
    with pytest.raises(ValueError) as caught:
        if kind == "idempotency store":
            open_idempotency_store(url)
        elif kind == "checkout journal":
            await open_journal(url)
        else:
            await open_queue(url)
    message = str(caught.value)
    assert message.startswith(f"{kind} URL 'redis+sentinel://:***@")
    assert problem in message
    assert "Secret" not in message


def test_both_passwords_are_hidden_in_every_form() -> None:
    assert (
        redact_url(URL) == "redis+sentinel://app:***@10.0.0.1:26379,10.0.0.2:26380,[::1]/mymaster/2"
    )
    shown = redact_secrets(URL)
    assert "Secret" not in shown
    assert "sentinel_password=***" in shown and "prefix=p:" in shown
    query_only = "redis+sentinel://h/svc?password=m-Secret&sentinel_password=s-Secret"
    assert "Secret" not in redact_secrets(query_only)
    parsed = StoreUrl.parse(query_only, "checkout journal")
    assert "Secret" not in repr(parsed)
    assert parsed.scrub("AUTH m-Secret, then s-Secret") == "AUTH ***, then ***"


def test_the_config_takes_a_sentinel_url_for_every_store() -> None:
    config = make_config({"store": URL, "idempotency": {"store": URL}, "queue": {"store": URL}})
    assert config.idempotency_store == config.queue_store == URL
    assert "redis+sentinel" in SCHEMES
    pattern = StoreUrlField.__metadata__[1].json_schema["pattern"]  # type: ignore[attr-defined]
    assert re.match(pattern, URL) and not re.match(pattern, "redissentinel://h/s")


# -- through a real Sentinel ------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelSet]:
    with sentinel_set() as servers:
        yield servers


@pytest.fixture
def fresh_sentinels() -> Iterator[SentinelSet]:
    """A set of its own for a test that fails over: after a failover the old master is
    demoted only seconds later, and until then there is no replica to promote again."""
    with sentinel_set() as servers:
        yield servers


def _prefix() -> str:
    return f"t-{uuid.uuid4().hex}:"


async def test_the_idempotency_store_round_trips_through_a_sentinel(
    sentinels: SentinelSet,
) -> None:
    store = open_idempotency_store(sentinels.url(prefix=_prefix()))
    try:
        assert MASTER_PASSWORD not in store.name and SENTINEL_PASSWORD not in store.name
        assert store.name == f"redis+sentinel://:***@127.0.0.1:{sentinels.sentinel.port}/mymaster/0"
        assert (await store.claim("k", "fp", 60)).state.value == "claimed"
        assert (await store.claim("k", "fp", 60)).state.value == "in_progress"
    finally:
        await store.close()


async def test_the_checkout_journal_round_trips_through_a_sentinel(
    sentinels: SentinelSet,
) -> None:
    journal = await open_journal(sentinels.url(prefix=_prefix(), ttl="1h"))
    try:
        assert await journal.create(CheckoutRecord(id="co-1", key="k"))
        found = await journal.get("co-1")
        assert found is not None and found.key == "k"
        assert [r.id for r in await journal.unfinished(older_than=0)] == ["co-1"]
    finally:
        await journal.close()


async def test_the_job_queue_round_trips_through_a_sentinel(sentinels: SentinelSet) -> None:
    queue = await open_queue(sentinels.url(prefix=_prefix()))
    try:
        assert await queue.enqueue(Job(type="email", payload={}, id="j1"))
        taken = await queue.take("w1", 30.0)
        assert taken is not None and taken.id == "j1"
        await queue.ack(taken)
        assert await queue.depth() == 0
    finally:
        await queue.close()


async def test_a_master_without_persistence_is_reported_not_durable(
    sentinels: SentinelSet,
) -> None:
    durability = await probe_durability(sentinels.url())
    assert durability.durable is False
    assert "appendonly no" in durability.detail


async def test_a_master_that_takes_writes_without_replicas_is_a_failover_risk(
    sentinels: SentinelSet,
) -> None:
    assert "min-replicas-to-write" in (await probe_durability(sentinels.url())).caveat
    with sentinel_set(master_args=("--min-replicas-to-write", "1")) as guarded:
        assert (await probe_durability(guarded.url())).caveat == ""


async def test_a_wrong_sentinel_password_is_a_store_outage_without_the_password(
    sentinels: SentinelSet,
) -> None:
    url = sentinels.url(sentinel_password="wr0ng-Pw", prefix=_prefix())
    store = open_idempotency_store(url)
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await store.claim("k", "fp", 60)
    finally:
        await store.close()
    assert "wr0ng-Pw" not in str(caught.value) and MASTER_PASSWORD not in str(caught.value)


async def test_a_store_follows_a_failover_to_the_new_master(
    fresh_sentinels: SentinelSet,
) -> None:
    """Once the Sentinel names the new master, the store's writes reach it within the
    pool's master check, although its pooled connection to the old master still works
    (the old master takes writes until the Sentinel demotes it, seconds later)."""
    store = open_idempotency_store(fresh_sentinels.url(prefix=_prefix()))
    try:
        assert (await store.claim("before", "fp", 60)).state.value == "claimed"
        old = fresh_sentinels.failover()
        new, _ = fresh_sentinels.wait_for_new_master(old)
        switched = time.monotonic()
        for attempt in range(1000):  # bounded by the time check below
            with contextlib.suppress(StoreUnavailable):  # a refusal while it moves is fine
                await store.claim(f"after-{attempt}", "fp", 60)
            with fresh_sentinels.server(new).client() as client:
                if client.exists(f"{store.prefix}after-{attempt}"):
                    break
            assert time.monotonic() - switched < MASTER_CHECK_INTERVAL + 2, "still the old one"
            await asyncio.sleep(0.05)
        assert fresh_sentinels.role(new) == "master"
    finally:
        await store.close()


async def test_a_connection_busy_during_the_switch_is_closed_when_it_comes_back(
    fresh_sentinels: SentinelSet,
) -> None:
    """redis-py's pool closes only idle connections when it learns the master moved; one
    in use at that moment must not go back to the pool still talking to the old master."""
    store = open_idempotency_store(fresh_sentinels.url(prefix=_prefix()))
    pool = store._redis.connection_pool  # the pool under test
    try:
        await store.claim("warm", "fp", 60)  # the pool has learnt the master
        busy = await pool.get_connection()
        assert busy.is_connected
        old = fresh_sentinels.failover()
        await asyncio.to_thread(fresh_sentinels.wait_for_new_master, old)
        switched = time.monotonic()
        while pool.master_address[1] == old:  # another command's check learns of it
            with contextlib.suppress(StoreUnavailable):
                await store.claim(f"k-{time.monotonic()}", "fp", 60)
            assert time.monotonic() - switched < MASTER_CHECK_INTERVAL + 2
            await asyncio.sleep(0.05)
        assert busy.is_connected and busy.port == old  # still on the old master
        await pool.release(busy)
        assert not busy.is_connected
    finally:
        await store.close()
