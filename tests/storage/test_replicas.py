"""Writes a replica holds before they count (`wait_replicas`): a write no replica
confirmed is the store's outage, never an acknowledged write that a failover could
drop; reads are not held up; and during a Sentinel failover, or while the master's
replicas in sync are not known, writes are refused."""

from __future__ import annotations

import os
import re
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from proxy.checkout.journal import CheckoutRecord
from proxy.storage.errors import StoreUnavailable
from proxy.storage.open import open_idempotency_store, open_journal, redis_client
from proxy.storage.replicas import ALL_IN_SYNC, NotReplicated, replicas_in_sync
from proxy.storage.sentinel import FollowingMasterPool, FollowingSentinel
from proxy.storage.url import StoreKind, StoreUrl

from .redis_servers import RedisProcess, SentinelSet, redis_server, sentinel_set

INFO = """# Replication
role:master
connected_slaves:4
slave0:ip=10.0.0.2,port=6379,state=online,offset=4410,lag=0
slave1:ip=10.0.0.3,port=6379,state=online,offset=4410,lag=2
slave2:ip=10.0.0.4,port=6379,state=online,offset=3900,lag=7
slave3:ip=10.0.0.5,port=6379,state=wait_bgsave,offset=0,lag=0
master_failover_state:no-failover
"""


def test_replicas_in_sync_are_online_with_a_recent_acknowledgement() -> None:
    assert replicas_in_sync(INFO) == 2  # not the one 7 s silent, nor the one still loading
    assert replicas_in_sync(INFO, max_lag=0) == 1
    assert replicas_in_sync("# Replication\r\nrole:slave\r\nmaster_host:10.0.0.1\r\n") == 0


def test_a_sentinel_reporting_a_failover_is_remembered_per_service() -> None:
    sentinel = FollowingSentinel([("127.0.0.1", 1)])
    state = {"is_master": True, "is_sdown": False, "is_odown": False, "num-other-sentinels": 0}
    assert sentinel.check_master_state({**state, "flags": "master,failover_in_progress"}, "a")
    assert sentinel.check_master_state({**state, "flags": {"master"}}, "b")  # RESP3: a set
    assert sentinel.failing_over == {"a": True, "b": False}


def _url(server: RedisProcess, **query: str) -> str:
    params = "&".join(f"{key}={value}" for key, value in {"prefix": _prefix(), **query}.items())
    return f"redis://127.0.0.1:{server.port}/0?{params}"


def _prefix() -> str:
    return f"t-{uuid.uuid4().hex}:"


def test_what_a_store_waits_for_follows_its_url_and_kind() -> None:
    def waits(url: str, kind: StoreKind = "checkout journal") -> int:
        return redis_client(StoreUrl.parse(url, kind)).replicas

    sentinel = "redis+sentinel://127.0.0.1:26379/mymaster/0"
    assert waits(sentinel) == ALL_IN_SYNC
    assert waits(sentinel, "rate limit store") == 0  # a lost count is not lost money
    assert waits(f"{sentinel}?wait_replicas=0") == 0
    assert waits("redis://127.0.0.1:6379/0") == 0
    assert waits("redis://127.0.0.1:6379/0?wait_replicas=2") == 2
    for query, problem in [
        ("wait_replicas=all", "needs a redis+sentinel:// URL"),
        ("wait_replicas=-1", "wait_replicas must be at least 0"),
        ("wait_replicas=two", "wait_replicas='two' is not a whole number"),
        ("replica_timeout=0", "replica_timeout must be positive"),
    ]:
        with pytest.raises(ValueError, match=re.escape(problem)):
            waits(f"redis://127.0.0.1:6379/0?{query}")


async def test_a_write_no_replica_confirmed_is_an_outage_and_a_read_is_not_held() -> None:
    with redis_server() as server:  # a master without a replica
        prefix = _prefix()
        waited = _url(server, prefix=prefix, wait_replicas="1", replica_timeout="50ms")
        store = open_idempotency_store(waited)
        unwaited = open_idempotency_store(_url(server, prefix=prefix))
        try:
            with pytest.raises(StoreUnavailable, match="confirmed by 0 of 1 replica"):
                await store.claim("k", "fp", 60)
            # the master kept it: an unknown outcome, as the outage reports
            assert (await unwaited.claim("k", "fp", 60)).state.value == "in_progress"
            assert (await unwaited.claim("k2", "fp", 60)).state.value == "claimed"
        finally:
            await store.close()
            await unwaited.close()


@contextmanager
def stopped(server: RedisProcess) -> Iterator[None]:
    """The server frozen (SIGSTOP): connected, but neither reading nor acknowledging."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


@pytest.fixture
def sentinels() -> Iterator[SentinelSet]:
    with sentinel_set() as servers:
        yield servers


async def test_a_write_waits_for_the_replica_and_fails_while_it_is_frozen(
    sentinels: SentinelSet,
) -> None:
    """The window that lost records in a failover: the master acknowledges a write its
    replica does not have yet. Waited for, that write fails instead (and succeeds
    again once the replica is back); not waited for, it is acknowledged."""
    prefix = _prefix()
    journal = await open_journal(sentinels.url(prefix=prefix, replica_timeout="200ms"))
    unwaited = await open_journal(sentinels.url(prefix=prefix, wait_replicas="0"))
    try:
        assert await journal.create(CheckoutRecord(id="before", key="k"))
        with stopped(sentinels.replica):
            with pytest.raises(StoreUnavailable, match="confirmed by 0 of 1 replica"):
                await journal.create(CheckoutRecord(id="frozen", key="k"))
            assert await unwaited.create(CheckoutRecord(id="unwaited", key="k"))
            assert (await journal.get("before")) is not None  # reads go on
        assert await journal.create(CheckoutRecord(id="after", key="k"))
    finally:
        await journal.close()
        await unwaited.close()


def _following_pool(client: Any) -> FollowingMasterPool:
    pool = client.connection_pool
    assert isinstance(pool, FollowingMasterPool)
    return pool


async def test_a_count_the_master_did_not_answer_keeps_the_last_one(
    sentinels: SentinelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An `INFO` that fails must not turn "wait for every replica" into "wait for
    none": the count known before stands until the master answers again."""
    client = redis_client(StoreUrl.parse(sentinels.url(), "checkout journal"))
    pool = _following_pool(client)
    try:
        await client.set(f"{_prefix()}k", "v")
        assert pool.replicas_in_sync == 1

        async def no_answer() -> int | None:
            return None

        monkeypatch.setattr(pool, "_count_replicas_in_sync", no_answer)
        pool._next_check = 0.0  # due now
        await pool.follow_master()

        assert pool.replicas_in_sync == 1
        await client.set(f"{_prefix()}k", "v")  # still waited for, and confirmed
    finally:
        await client.aclose()


async def test_writes_are_refused_until_the_replicas_in_sync_are_known(
    sentinels: SentinelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis_client(StoreUrl.parse(sentinels.url(), "checkout journal"))
    pool = _following_pool(client)

    async def no_answer() -> int | None:
        return None

    monkeypatch.setattr(pool, "_count_replicas_in_sync", no_answer)
    key = f"{_prefix()}k"
    try:
        with pytest.raises(NotReplicated, match="replicas in sync are not known yet"):
            await client.set(key, "v")
        assert await client.get(key) is None  # reads go on; the write was not sent
        monkeypatch.undo()
        pool._next_check = 0.0
        await client.set(key, "v")
        assert pool.replicas_in_sync == 1
    finally:
        await client.aclose()
