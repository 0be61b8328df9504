"""The PostgreSQL queue's take and ack commit without waiting for the WAL's flush, for
their own transaction only: the pooled connection they ran on, which the journal and
the idempotency store share, still commits synchronously afterwards."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.jobs import Job
from proxy.jobs.postgres_queue import PostgresQueue
from proxy.storage.open import open_queue
from tests.postgres import fresh_schema, schema_url


@pytest.fixture
async def queue() -> AsyncIterator[PostgresQueue]:
    """A PostgreSQL queue in a schema of its own, holding one job `j1`, not yet taken."""
    async with fresh_schema() as schema:
        opened = await open_queue(schema_url(schema))
        assert isinstance(opened, PostgresQueue)
        try:
            assert await opened.enqueue(Job(type="capture", payload={"n": 1}, id="j1"))
            yield opened
        finally:
            await opened.close()


async def test_take_and_ack_leave_the_connection_synchronous(queue: PostgresQueue) -> None:
    taken = await queue.take("w1", 30.0)
    assert taken is not None and taken.id == "j1" and taken.payload == {"n": 1}
    assert await queue.take("w2", 30.0) is None  # leased: nobody else gets it
    await queue.ack(taken)
    assert await queue.depth() == 0
    db = queue._db  # the pool the take and the ack ran on
    async with db.connection() as conn:
        cursor = await conn.execute("SHOW synchronous_commit")
        assert await cursor.fetchone() == ("on",)


async def test_the_ack_turns_it_off_for_its_own_transaction(queue: PostgresQueue) -> None:
    """The ack is one prepared statement that sets `synchronous_commit` itself: run in a
    transaction of the test's, it has left the setting off there when it deleted its row."""
    taken = await queue.take("w1", 30.0)
    assert taken is not None
    async with queue._db.connection() as conn, conn.transaction():
        cursor = await conn.execute(queue._sql["ack"], (taken.id, taken.receipt))
        assert cursor.rowcount == 1
        cursor = await conn.execute("SHOW synchronous_commit")
        assert await cursor.fetchone() == ("off",)
    assert await queue.depth() == 0
