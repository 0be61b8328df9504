"""What the PostgreSQL stores add to the contract suites: migrations that replicas can
race, statement timeouts reported as the store's error, the claim and the journal's
first record in one transaction, and workers woken by NOTIFY."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from proxy.checkout.journal import CheckoutRecord, JointJournal
from proxy.idempotency.store import ClaimState, JointClaims
from proxy.jobs import Job, Worker
from proxy.storage.errors import StoreUnavailable
from proxy.storage.joint import JointInsert
from proxy.storage.open import open_idempotency_store, open_journal, open_queue
from proxy.storage.postgres import MIGRATIONS, migrate, quoted_schema
from tests.postgres import PG_URL, TcpGate, fresh_schema, row_count, schema_url


async def _versions(schema: str) -> list[int]:
    async with await psycopg.AsyncConnection.connect(PG_URL) as conn:
        cursor = await conn.execute(f'SELECT version FROM "{schema}".schema_versions')
        return sorted(row[0] for row in await cursor.fetchall())


# -- migrations ---------------------------------------------------------------------------


async def test_concurrent_migrations_on_a_fresh_schema_apply_each_version_once() -> None:
    async with fresh_schema() as schema:
        connections = [
            await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) for _ in range(8)
        ]
        try:
            applied = await asyncio.gather(
                *(migrate(conn, quoted_schema(schema)) for conn in connections)
            )
        finally:
            for conn in connections:
                await conn.close()
        every = [version for versions in applied for version in versions]
        assert sorted(every) == [m.version for m in MIGRATIONS]  # once each, by one opener
        assert await _versions(schema) == [m.version for m in MIGRATIONS]


async def test_replicas_opening_every_store_at_once_all_succeed() -> None:
    async with fresh_schema() as schema:
        url = schema_url(schema)
        queues = await asyncio.gather(*(open_queue(url) for _ in range(4)))
        journals = await asyncio.gather(*(open_journal(url) for _ in range(4)))
        stores = [open_idempotency_store(url) for _ in range(4)]
        try:
            await asyncio.gather(
                *(journal.get("co-1") for journal in journals),
                *(store.claim(f"k{i}", "fp", 60) for i, store in enumerate(stores)),
            )
            assert [await queue.depth() for queue in queues] == [0, 0, 0, 0]
        finally:
            for opened in (*queues, *journals, *stores):
                await opened.close()
        assert await _versions(schema) == [m.version for m in MIGRATIONS]


async def test_a_schema_that_is_not_a_plain_name_is_refused_naming_the_store() -> None:
    with pytest.raises(ValueError, match=r"checkout journal URL .*schema="):
        await open_journal(f"{PG_URL}?schema=Robert%27);DROP")


# -- timeouts --------------------------------------------------------------------------------


async def test_a_statement_stuck_on_a_lock_is_unavailable_within_the_timeout_then_works() -> None:
    async with fresh_schema() as schema:
        journal = await open_journal(schema_url(schema, timeout="0.3"))
        blocker = await psycopg.AsyncConnection.connect(PG_URL)
        try:
            await journal.create(CheckoutRecord(id="co-1", key="k"))
            await blocker.execute(
                f'SELECT 1 FROM "{schema}".checkout_journal WHERE id = %s FOR UPDATE', ("co-1",)
            )
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as caught:
                await journal.set_step("co-1", "payment", {"status": "ok"})
            assert time.monotonic() - started < 3
            assert "statement timeout" in str(caught.value)
            await blocker.rollback()
            await journal.set_step("co-1", "payment", {"status": "ok"})
        finally:
            await blocker.close()
            await journal.close()


# -- the claim and the journal's first record in one transaction -----------------------------


async def test_the_claim_and_the_first_record_commit_together() -> None:
    async with fresh_schema() as schema:
        url = schema_url(schema)
        store = open_idempotency_store(url)
        journal = await open_journal(url)
        try:
            assert isinstance(store, JointClaims) and isinstance(journal, JointJournal)
            insert = journal.joint_create(CheckoutRecord(id="co-1", key="k"))
            assert store.accepts(insert)

            claimed = await store.claim_joint("k", "fp", 60, insert)
            assert (claimed.state, claimed.joint) == (ClaimState.CLAIMED, True)
            found = await journal.get("co-1")
            assert found is not None and found.key == "k"

            again = await store.claim_joint("k", "fp", 60, insert)  # no second row either
            assert (again.state, again.joint) == (ClaimState.IN_PROGRESS, False)
            await store.abandon("k")
            lapsed = await store.claim_joint("k", "fp", 60, insert)  # the record was there
            assert (lapsed.state, lapsed.joint) == (ClaimState.CLAIMED, False)
        finally:
            await store.close()
            await journal.close()


async def test_a_failing_first_record_leaves_neither_the_claim_nor_the_record() -> None:
    async with fresh_schema() as schema:
        url = schema_url(schema)
        store = open_idempotency_store(url)
        journal = await open_journal(url)
        try:
            assert isinstance(store, JointClaims) and isinstance(journal, JointJournal)
            good = journal.joint_create(CheckoutRecord(id="co-1", key="k"))
            # the journal insert fails after the claim's insert ran in the transaction
            failing = JointInsert(
                good.database, good.sql.replace("%s::jsonb", "%s::int"), good.params
            )

            with pytest.raises(StoreUnavailable):
                await store.claim_joint("k", "fp", 60, failing)

            assert await row_count(schema, "idempotency_records") == 0
            assert await row_count(schema, "checkout_journal") == 0
            assert (await store.claim_joint("k", "fp", 60, good)).joint
        finally:
            await store.close()
            await journal.close()


async def test_an_insert_for_another_database_is_not_accepted() -> None:
    async with fresh_schema() as schema:
        store = open_idempotency_store(schema_url(schema))
        try:
            assert isinstance(store, JointClaims)
            elsewhere = JointInsert("postgresql://postgres@10.0.0.9:5432/test", "SELECT 1", ())
            assert not store.accepts(elsewhere)
            with pytest.raises(ValueError, match="not the database"):
                await store.claim_joint("k", "fp", 60, elsewhere)
        finally:
            await store.close()


async def test_stores_in_two_schemas_of_one_database_accept_each_others_inserts() -> None:
    async with fresh_schema() as one, fresh_schema() as other:
        store = open_idempotency_store(schema_url(one))
        journal = await open_journal(schema_url(other))
        try:
            assert isinstance(store, JointClaims) and isinstance(journal, JointJournal)
            insert = journal.joint_create(CheckoutRecord(id="co-1", key="k"))
            assert store.accepts(insert)
            assert (await store.claim_joint("k", "fp", 60, insert)).joint
            assert await journal.get("co-1") is not None
        finally:
            await store.close()
            await journal.close()


# -- LISTEN/NOTIFY -----------------------------------------------------------------------------


async def test_an_idle_worker_is_woken_by_an_enqueue_long_before_its_poll_interval() -> None:
    async with fresh_schema() as schema:
        url = schema_url(schema)
        queue = await open_queue(url)
        producer = await open_queue(url)  # another replica's queue object
        done = asyncio.Event()

        async def handler(job: Job) -> None:
            done.set()

        worker = Worker(queue, {"email": handler}, consumer="w1", safety_poll_interval=30.0)
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        try:
            await asyncio.sleep(0.3)  # the worker found nothing and is waiting
            started = time.monotonic()
            await producer.enqueue(Job(type="email", payload={}, id="j1"))
            await asyncio.wait_for(done.wait(), timeout=5)
            assert time.monotonic() - started < 2
        finally:
            stop.set()
            await asyncio.wait_for(running, timeout=5)  # stop wakes it too
            await producer.close()
            await queue.close()


async def test_wait_for_work_times_out_quietly_when_nothing_is_enqueued() -> None:
    async with fresh_schema() as schema:
        queue = await open_queue(schema_url(schema))
        try:
            # the first call only starts listening, and says to look: a job enqueued
            # before then was announced to no one
            assert await queue.wait_for_work(0.2) is True  # type: ignore[attr-defined]
            started = time.monotonic()
            assert await queue.wait_for_work(0.2) is False  # type: ignore[attr-defined]
            assert 0.15 < time.monotonic() - started < 2
        finally:
            await queue.close()


# -- outages ----------------------------------------------------------------------------------


async def test_an_outage_is_reported_promptly_and_the_store_works_again_when_it_ends() -> None:
    """Every connection dropped and new ones refused (a failover, a restart): the store
    says so within its connect timeout, and answers again within 2 s of the return."""
    async with fresh_schema() as schema:
        gate = TcpGate()
        await gate.open()
        store = open_idempotency_store(f"{gate.url}?schema={schema}&connect_timeout=1")
        try:
            assert (await store.claim("before", "fp", 60)).state is ClaimState.CLAIMED
            await gate.cut()

            for attempt in range(3):  # a fresh connection each time, never a hang
                started = time.monotonic()
                with pytest.raises(StoreUnavailable) as caught:
                    await store.claim(f"during-{attempt}", "fp", 60)
                assert time.monotonic() - started < 2.5
            assert caught.value.store == f"postgresql://***@127.0.0.1:{gate.port}/test"

            await gate.open()
            back = time.monotonic()
            while True:
                try:
                    result = await store.claim("after", "fp", 60)
                    break
                except StoreUnavailable:
                    assert time.monotonic() - back < 2.0, "the store did not come back"
                    await asyncio.sleep(0.05)
            assert result.state is ClaimState.CLAIMED
            assert (await store.claim("before", "fp", 60)).state is ClaimState.IN_PROGRESS
        finally:
            await store.close()
            await gate.cut()
