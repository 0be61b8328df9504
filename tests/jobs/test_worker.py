"""Worker behaviour on every backend: results, retries, dead letters, restarts, stop."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from proxy.jobs import Job, JobQueue, RetryPolicy, WakesWorkers, Worker, WorkerHooks
from proxy.jobs.worker import TAKE_RETRY
from proxy.resilience.backoff import backoff_ceiling
from proxy.resilience.clock import FakeClock
from proxy.storage.open import open_queue
from tests.jobs.conftest import skip_if_broker_timed
from tests.jobs.polling import eventually


class RecordingHooks(WorkerHooks):
    def __init__(self) -> None:
        self.results: list[tuple[str, str]] = []

    def on_result(self, job_type: str, result: str) -> None:
        self.results.append((job_type, result))


class FlakyHandler:
    """Fails its first `failures` calls, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[Job] = []

    async def __call__(self, job: Job) -> None:
        self.calls.append(job)
        if len(self.calls) <= self.failures:
            raise ConnectionError(f"upstream refused (call {len(self.calls)})")


async def test_handler_success_acks_the_job(queue: JobQueue, wall: FakeClock) -> None:
    hooks = RecordingHooks()
    handler = FlakyHandler(failures=0)
    worker = Worker(queue, {"email": handler}, consumer="w1", hooks=hooks, wall=wall)
    await queue.enqueue(Job(type="email", payload={"to": "x"}, id="j1"))

    assert await worker.run_once() == 1
    assert [job.id for job in handler.calls] == ["j1"]
    assert hooks.results == [("email", "ok")]
    assert await queue.depth() == 0
    assert await worker.run_once() == 0


async def test_failing_handler_is_retried_with_backoff_then_dead_lettered(
    queue: JobQueue, wall: FakeClock, queue_url: str
) -> None:
    skip_if_broker_timed(queue_url)
    hooks = RecordingHooks()
    handler = FlakyHandler(failures=99)
    policy = RetryPolicy(max_attempts=3, base=10.0, multiplier=2.0, jitter="none")
    worker = Worker(
        queue,
        {"void": handler},
        policies={"void": policy},
        consumer="w1",
        hooks=hooks,
        wall=wall,
    )
    await queue.enqueue(Job(type="void", payload={}, id="j1"))

    assert await worker.run_once() == 1  # attempt 1 fails: retry in 10 s
    assert await worker.run_once() == 0
    wall.advance(9.9)
    assert await worker.run_once() == 0
    wall.advance(0.1)
    assert await worker.run_once() == 1  # attempt 2 fails: retry in 20 s
    wall.advance(19.9)
    assert await worker.run_once() == 0
    wall.advance(0.1)
    assert await worker.run_once() == 1  # attempt 3 fails: dead

    assert hooks.results == [("void", "retry"), ("void", "retry"), ("void", "dead")]
    assert [job.attempts for job in handler.calls] == [0, 1, 2]
    (dead,) = await queue.dead()
    assert dead.id == "j1" and dead.attempts == 3
    assert dead.last_error == "ConnectionError: upstream refused (call 3)"
    assert await queue.depth() == 0
    wall.advance(3600)
    assert await worker.run_once() == 0, "a dead job is never taken again by itself"


async def test_redriven_job_runs_again_and_succeeds(queue: JobQueue, wall: FakeClock) -> None:
    hooks = RecordingHooks()
    handler = FlakyHandler(failures=1)
    worker = Worker(
        queue,
        {"capture": handler},
        default_policy=RetryPolicy(max_attempts=1),
        consumer="w1",
        hooks=hooks,
        wall=wall,
    )
    await queue.enqueue(Job(type="capture", payload={"amount": 5}, id="j1"))
    assert await worker.run_once() == 1
    assert [job.id for job in await queue.dead()] == ["j1"]

    assert await queue.redrive("j1") is True
    assert await worker.run_once() == 1
    assert hooks.results == [("capture", "dead"), ("capture", "ok")]
    assert await queue.dead() == []
    assert await queue.depth() == 0


async def test_unknown_job_type_is_dead_lettered_with_a_clear_error(
    queue: JobQueue, wall: FakeClock
) -> None:
    hooks = RecordingHooks()
    worker = Worker(queue, {"email": FlakyHandler(0)}, consumer="w1", hooks=hooks, wall=wall)
    await queue.enqueue(Job(type="fax", payload={}, id="j1"))

    assert await worker.run_once() == 1
    (dead,) = await queue.dead()
    assert dead.last_error == "no handler for job type 'fax' (known types: email)"
    assert hooks.results == [("fax", "dead")]


async def test_a_new_worker_after_a_restart_runs_the_pending_job(
    queue_url: str, wall: FakeClock
) -> None:
    before = await open_queue(queue_url, wall=wall)
    await before.enqueue(Job(type="refund", payload={"amount": 3}, id="j1"))
    await before.close()

    after = await open_queue(queue_url, wall=wall)
    try:
        handler = FlakyHandler(failures=0)
        worker = Worker(after, {"refund": handler}, consumer="replacement", wall=wall)
        assert await worker.run_once() == 1
        assert [job.payload for job in handler.calls] == [{"amount": 3}]
        assert await after.depth() == 0
    finally:
        await after.close()


async def test_a_new_worker_takes_over_the_job_of_a_killed_worker(
    queue: JobQueue, wall: FakeClock
) -> None:
    visibility = 0.05
    await queue.enqueue(Job(type="release", payload={}, id="j1"))
    assert await queue.take("killed-worker", visibility) is not None  # never acked

    handler = FlakyHandler(failures=0)
    worker = Worker(
        queue,
        {"release": handler},
        consumer="survivor",
        visibility_timeout=visibility,
        wall=wall,
    )
    wall.advance(visibility)

    async def ran_one() -> bool:
        return await worker.run_once() == 1

    await eventually(ran_one)
    assert [job.id for job in handler.calls] == ["j1"]
    assert await queue.depth() == 0


async def test_run_processes_jobs_concurrently_until_stopped(
    queue: JobQueue, wall: FakeClock
) -> None:
    started = Counter[str]()
    all_started = asyncio.Event()
    release = asyncio.Event()

    async def handler(job: Job) -> None:
        started[job.id] += 1
        if len(started) == 3:
            all_started.set()
        await release.wait()

    for n in range(3):
        await queue.enqueue(Job(type="t", payload={}, id=f"j{n}"))
    worker = Worker(
        queue, {"t": handler}, consumer="w1", concurrency=3, poll_interval=0.01, wall=wall
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    async with asyncio.timeout(3):
        await all_started.wait()  # three at once: none finished before the last started
    release.set()

    async def drained() -> bool:
        return await queue.depth() == 0

    await eventually(drained)
    stop.set()
    await asyncio.wait_for(running, 3)
    assert started == Counter({"j0": 1, "j1": 1, "j2": 1})


async def test_stop_waits_for_in_flight_jobs_and_leaves_untaken_ones_pending(
    queue: JobQueue, wall: FakeClock
) -> None:
    in_handler = asyncio.Event()
    release = asyncio.Event()
    done: list[str] = []

    async def handler(job: Job) -> None:
        in_handler.set()
        await release.wait()
        done.append(job.id)

    await queue.enqueue(Job(type="t", payload={}, id="first"))
    wall.advance(1)
    await queue.enqueue(Job(type="t", payload={}, id="second"))
    worker = Worker(
        queue, {"t": handler}, consumer="w1", concurrency=1, poll_interval=0.01, wall=wall
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    async with asyncio.timeout(3):
        await in_handler.wait()

    stop.set()
    await asyncio.sleep(0.05)
    assert not running.done(), "run must wait for the job in flight"
    release.set()
    await asyncio.wait_for(running, 3)

    assert done == ["first"]
    assert await queue.depth() == 1
    leftover = await queue.take("w2", 30.0)
    assert leftover is not None and leftover.id == "second"


class AnnouncingQueue:
    """A SQLite queue that announces enqueues (as PostgreSQL's NOTIFY does), so the
    worker's `WakesWorkers` path is tested apart from any backend."""

    def __init__(self, inner: JobQueue) -> None:
        self.inner = inner
        self.name = inner.name
        self.announced = asyncio.Event()
        self.waiting = asyncio.Event()
        self.waits: list[float] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def enqueue(self, job: Job) -> bool:
        added = await self.inner.enqueue(job)
        self.announced.set()
        return added

    async def wait_for_work(self, timeout: float) -> bool:
        self.waits.append(timeout)
        self.waiting.set()
        try:
            async with asyncio.timeout(timeout):
                await self.announced.wait()
        except TimeoutError:
            return False
        self.announced.clear()
        return True


async def test_an_idle_worker_waits_for_an_announcing_queue_instead_of_polling(
    tmp_path: Path,
) -> None:
    queue = AnnouncingQueue(await open_queue(f"sqlite:///{tmp_path}/q.db"))
    assert isinstance(queue, WakesWorkers)
    done = asyncio.Event()

    async def handler(job: Job) -> None:
        done.set()

    worker = Worker(queue, {"t": handler}, consumer="w1", safety_poll_interval=30.0)  # type: ignore[arg-type]
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(3):
            await queue.waiting.wait()  # idle: waiting for an announcement, not sleeping
        await queue.enqueue(Job(type="t", payload={}, id="j1"))
        async with asyncio.timeout(3):  # long before the 30 s poll
            await done.wait()
        assert queue.waits[0] == 30.0
    finally:
        stop.set()
        await asyncio.wait_for(running, 3)  # stop interrupts the wait too
        await queue.inner.close()


def test_a_failed_take_is_retried_after_a_doubling_delay() -> None:
    delays = [backoff_ceiling(TAKE_RETRY, n) for n in range(1, 8)]
    assert delays[:3] == [0.05, 0.1, 0.2]
    assert delays[-1] == 2.0 and backoff_ceiling(TAKE_RETRY, 10_000) == 2.0


class RefusingQueue:
    """A queue whose take fails at once, as a store refusing writes in a failover does."""

    name = "refusing"

    def __init__(self) -> None:
        self.takes = 0
        self.third = asyncio.Event()

    async def take(self, consumer: str, visibility_timeout: float) -> Job | None:
        self.takes += 1
        if self.takes == 3:
            self.third.set()
        raise RuntimeError("refused")


async def test_a_queue_that_refuses_at_once_is_not_asked_in_a_loop() -> None:
    queue = RefusingQueue()
    worker = Worker(queue, {}, consumer="w1", poll_interval=0.0)  # type: ignore[arg-type]
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        async with asyncio.timeout(5):
            await queue.third.wait()  # after 0.05 s and 0.1 s of waiting
        taken = queue.takes
        await asyncio.sleep(0.2)  # a loop would take thousands of times meanwhile
        assert queue.takes - taken <= 3
    finally:
        stop.set()
        await asyncio.wait_for(running, 3)
