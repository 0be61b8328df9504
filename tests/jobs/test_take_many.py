"""`TakesMany` on PostgreSQL: a worker with free slots leases several due jobs in one
statement, so a checkout's screening and email cost one take, not two (and the empty
take that often followed the second)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.jobs import Job, Worker
from proxy.jobs.postgres_queue import PostgresQueue
from proxy.jobs.queue import TakesMany
from proxy.storage.open import open_queue
from tests.jobs.test_idle_wakeups import Watched
from tests.postgres import fresh_schema, schema_url


@pytest.fixture
async def queue() -> AsyncIterator[PostgresQueue]:
    async with fresh_schema() as schema:
        opened = await open_queue(schema_url(schema))
        assert isinstance(opened, PostgresQueue) and isinstance(opened, TakesMany)
        try:
            yield opened
        finally:
            await opened.close()


async def test_it_leases_up_to_its_limit_oldest_first(queue: PostgresQueue) -> None:
    for n in range(5):
        await queue.enqueue(Job(type="t", payload={"n": n}, id=f"j{n}"))

    first = await queue.take_many("w1", 30.0, 3)
    rest = await queue.take_many("w2", 30.0, 3)

    assert [job.id for job in first] == ["j0", "j1", "j2"]
    assert [job.id for job in rest] == ["j3", "j4"]
    assert await queue.take_many("w3", 30.0, 3) == []
    assert not any(job.redelivered for job in first + rest)


async def test_each_job_of_one_take_is_acked_or_retried_on_its_own(
    queue: PostgresQueue,
) -> None:
    await queue.enqueue_many([Job(type="t", payload={}, id="a"), Job(type="t", payload={}, id="b")])
    a, b = await queue.take_many("w1", 30.0, 2)

    await queue.ack(a)
    await queue.retry(b, "boom", run_at=0.0)

    assert await queue.depth() == 1
    again = await queue.take("w2", 30.0)
    assert again is not None and again.id == "b" and again.attempts == 1
    assert await queue.take_many("w2", 30.0, 2) == []


async def test_a_limit_below_one_is_refused(queue: PostgresQueue) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        await queue.take_many("w1", 30.0, 0)


async def test_a_worker_takes_a_checkouts_jobs_together(queue: PostgresQueue) -> None:
    watched = Watched(queue)
    receipts: dict[str, str | None] = {}
    both = asyncio.Event()

    async def handler(job: Job) -> None:
        receipts[job.id] = job.receipt
        if len(receipts) == 2:
            both.set()

    worker = Worker(watched, {"t": handler}, consumer="w1", safety_poll_interval=60.0)  # type: ignore[arg-type]
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        await watched.until(lambda: watched.waits >= 2)  # idle, listening
        await queue.enqueue_many(
            [Job(type="t", payload={}, id="fraud"), Job(type="t", payload={}, id="email")]
        )
        async with asyncio.timeout(5):
            await both.wait()
        # one lease token: both came from one take
        assert receipts["fraud"] == receipts["email"] is not None
    finally:
        stop.set()
        await asyncio.wait_for(running, 5)
