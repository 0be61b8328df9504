"""An idle worker of a queue that wakes it (`WakesWorkers`) takes only when there may
be work: an enqueue anywhere, a delayed job or retry falling due, a lease lapsing. Its
safety poll is set to 30 s here, so anything done sooner was woken, not polled."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from proxy.jobs import Job, JobQueue, RetryPolicy, Worker
from proxy.storage.open import open_queue
from tests.jobs.conftest import REDIS_URL
from tests.postgres import fresh_schema, schema_url

SAFETY_POLL = 30.0


class Watched:
    """A queue that counts its takes and its worker's waits, for awaiting them."""

    def __init__(self, inner: JobQueue) -> None:
        self.inner = inner
        self.name = inner.name
        self.takes = 0
        self.waits = 0
        self.changed = asyncio.Event()

    def __getattr__(self, name: str) -> object:
        found = getattr(self.inner, name)
        if name != "take_many":
            return found

        async def take_many(consumer: str, visibility_timeout: float, limit: int) -> object:
            jobs = await found(consumer, visibility_timeout, limit)
            self.takes += 1
            self.changed.set()
            return jobs

        return take_many  # counted like `take`, where the queue has it (`TakesMany`)

    async def take(self, consumer: str, visibility_timeout: float) -> Job | None:
        job = await self.inner.take(consumer, visibility_timeout)
        self.takes += 1
        self.changed.set()
        return job

    async def wait_for_work(self, timeout: float) -> bool:
        self.waits += 1
        self.changed.set()
        return await self.inner.wait_for_work(timeout)  # type: ignore[attr-defined, no-any-return]

    async def until(self, done: object, *, seconds: float = 3.0) -> None:
        """Await `done()` (re-checked after every take and wait)."""
        async with asyncio.timeout(seconds):
            while not done():  # type: ignore[operator]
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture(params=["postgresql", "redis"])
async def queue_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "redis":
        yield f"{REDIS_URL}?prefix=test-idle-{uuid.uuid4().hex}:"
        return
    async with fresh_schema() as schema:
        yield schema_url(schema)


async def _running(
    queue: Watched, handler: object, **options: object
) -> tuple[asyncio.Event, asyncio.Task[None]]:
    worker = Worker(
        queue,  # type: ignore[arg-type]
        {"t": handler},  # type: ignore[dict-item]
        consumer="w1",
        safety_poll_interval=SAFETY_POLL,
        **options,  # type: ignore[arg-type]
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    # idle: on PostgreSQL the first wait only opens the LISTEN connection (and says:
    # look again), so the second is the idle one
    idle_wait = 2 if type(queue.inner).__name__ == "PostgresQueue" else 1
    await queue.until(lambda: queue.waits >= idle_wait)
    return stop, task


async def test_an_idle_worker_does_not_poll(queue_url: str) -> None:
    queue = Watched(await open_queue(queue_url))

    async def handler(job: Job) -> None:
        pass

    stop, running = await _running(queue, handler)
    try:
        takes = queue.takes
        with pytest.raises(TimeoutError):  # at the old 200 ms poll: three takes
            await queue.until(lambda: queue.takes > takes, seconds=0.7)
    finally:
        stop.set()
        await asyncio.wait_for(running, 3)
        await queue.close()


async def test_a_job_enqueued_by_another_replica_wakes_the_idle_worker(queue_url: str) -> None:
    queue = Watched(await open_queue(queue_url))
    producer = await open_queue(queue_url)  # another replica's queue object
    done = asyncio.Event()

    async def handler(job: Job) -> None:
        done.set()

    stop, running = await _running(queue, handler)
    try:
        takes = queue.takes
        await producer.enqueue(Job(type="t", payload={}, id="j1"))
        async with asyncio.timeout(3):
            await done.wait()
        assert queue.takes - takes <= 2  # the job, and maybe a wake by its NOTIFY
    finally:
        stop.set()
        await asyncio.wait_for(running, 3)
        await producer.close()
        await queue.close()


async def test_a_delayed_job_of_another_replica_runs_when_due(queue_url: str) -> None:
    queue = Watched(await open_queue(queue_url))
    producer = await open_queue(queue_url)
    ran_at: list[float] = []

    async def handler(job: Job) -> None:
        ran_at.append(time.time())

    stop, running = await _running(queue, handler)
    try:
        run_at = time.time() + 0.3
        await producer.enqueue(Job(type="t", payload={}, id="later", run_at=run_at))
        await queue.until(lambda: bool(ran_at))
        assert ran_at[0] >= run_at
        assert queue.takes <= 6  # woken by the NOTIFY, then once when due
    finally:
        stop.set()
        await asyncio.wait_for(running, 3)
        await producer.close()
        await queue.close()


async def test_a_failed_job_is_retried_when_its_backoff_ends(queue_url: str) -> None:
    queue = Watched(await open_queue(queue_url))
    calls: list[float] = []

    async def handler(job: Job) -> None:
        calls.append(time.time())
        if len(calls) == 1:
            raise ConnectionError("upstream refused")

    policy = RetryPolicy(base=0.3, jitter="none")
    stop, running = await _running(queue, handler, default_policy=policy)
    try:
        await queue.enqueue(Job(type="t", payload={}, id="j1"))
        await queue.until(lambda: len(calls) == 2)
        assert calls[1] - calls[0] >= 0.29
    finally:
        stop.set()
        await asyncio.wait_for(running, 3)
        await queue.close()


async def test_a_lapsed_lease_is_taken_over_when_it_lapses(queue_url: str) -> None:
    if queue_url.startswith("redis"):
        pytest.skip("Redis learns of a lapsed lease at the safety poll")
    queue = Watched(await open_queue(queue_url))
    done: list[Job] = []

    async def handler(job: Job) -> None:
        done.append(job)

    await queue.inner.enqueue(Job(type="t", payload={}, id="j1"))
    lost = await queue.inner.take("killed", 0.4)  # its worker dies holding the lease
    assert lost is not None
    stop, running = await _running(queue, handler)
    try:
        await queue.until(lambda: bool(done))
        assert done[0].redelivered
    finally:
        stop.set()
        await asyncio.wait_for(running, 3)
        await queue.close()
