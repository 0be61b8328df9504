"""`EnqueuesMany` on PostgreSQL: a checkout's after-answer jobs in one durable write.

One statement inserts them all (or none, when it fails), skips an id already held as
`enqueue` does, and sends one NOTIFY when anything was new, so an idle worker of any
replica wakes and runs them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.jobs import EnqueuesMany, Job, Worker
from proxy.jobs.postgres_queue import PostgresQueue
from proxy.storage.open import open_queue
from tests.jobs.test_idle_wakeups import Watched
from tests.postgres import fresh_schema, schema_url


@pytest.fixture
async def queue_url() -> AsyncIterator[str]:
    async with fresh_schema() as schema:
        yield schema_url(schema)


async def _queue(url: str) -> PostgresQueue:
    queue = await open_queue(url)
    assert isinstance(queue, PostgresQueue) and isinstance(queue, EnqueuesMany)
    return queue


async def test_jobs_enqueued_together_are_each_taken_once(queue_url: str) -> None:
    queue = await _queue(queue_url)
    try:
        jobs = [Job(type="t", payload={"n": n}, id=f"j{n}") for n in range(3)]

        assert await queue.enqueue_many(jobs) == 3
        assert await queue.depth() == 3
        taken = [await queue.take("w", 30.0) for _ in range(4)]
        assert sorted(j.payload["n"] for j in taken if j is not None) == [0, 1, 2]
        assert taken[3] is None
    finally:
        await queue.close()


async def test_ids_already_held_are_skipped_as_enqueue_skips_them(queue_url: str) -> None:
    queue = await _queue(queue_url)
    try:
        assert await queue.enqueue(Job(type="t", payload={"first": True}, id="a"))

        added = await queue.enqueue_many(
            [Job(type="t", payload={"first": False}, id="a"), Job(type="t", payload={}, id="b")]
        )

        assert added == 1
        assert await queue.enqueue_many([Job(type="t", payload={}, id="b")]) == 0
        first = await queue.take("w", 30.0)
        assert first is not None and first.id == "a" and first.payload == {"first": True}
        assert await queue.depth() == 2
        assert await queue.enqueue_many([]) == 0
    finally:
        await queue.close()


async def test_jobs_enqueued_together_wake_an_idle_worker_of_another_replica(
    queue_url: str,
) -> None:
    consumer = Watched(await _queue(queue_url))
    producer = await _queue(queue_url)  # another replica's queue object
    seen: list[str] = []
    both = asyncio.Event()

    async def handler(job: Job) -> None:
        seen.append(job.id)
        if len(seen) == 2:
            both.set()

    # a safety poll far beyond the test: only the NOTIFY can wake the worker in time
    worker = Worker(
        consumer,  # type: ignore[arg-type]
        {"t": handler},
        consumer="w1",
        safety_poll_interval=60.0,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        # idle: the first wait opens the LISTEN connection (and says: look again), the
        # second is the idle one
        await consumer.until(lambda: consumer.waits >= 2)
        await producer.enqueue_many(
            [Job(type="t", payload={}, id="fraud"), Job(type="t", payload={}, id="email")]
        )
        async with asyncio.timeout(5):
            await both.wait()
        assert sorted(seen) == ["email", "fraud"]
    finally:
        stop.set()
        await asyncio.wait_for(running, 5)
        await producer.close()
        await consumer.close()
