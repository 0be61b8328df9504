"""The job queue on a real RabbitMQ: what the contract suite cannot show with a fake
clock (delays on the broker's clock), what is particular to a broker (no dedupe by id,
redelivery when a worker's connection dies), and outages (`rabbitmqctl
close_all_connections` mid-run)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.jobs import Job, JobQueue, QueueUnavailable, RetryPolicy, Worker
from proxy.jobs.amqp_queue import DELAY_LEVELS_MS, AmqpQueue, delay_level
from proxy.storage.open import open_queue
from tests.jobs.polling import eventually


@pytest.fixture
async def queue(amqp_url: str) -> AsyncIterator[JobQueue]:
    """On the real wall clock: the broker's TTLs run in real time."""
    opened = await open_queue(amqp_url)
    try:
        yield opened
    finally:
        await opened.close()


async def take_within(queue: JobQueue, seconds: float, *, visibility: float = 30.0) -> Job:
    taken: list[Job] = []

    async def took() -> bool:
        try:
            job = await queue.take("w", visibility)
        except QueueUnavailable:  # the connection is coming back: as the worker does, poll on
            return False
        if job is not None:
            taken.append(job)
        return job is not None

    await eventually(took, seconds=seconds)
    return taken[0]


async def rabbitmqctl(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await process.communicate()
    assert process.returncode == 0, f"rabbitmqctl {' '.join(args)} failed"
    return out.decode()


async def close_all_connections(amqp_url: str) -> int:
    """What `rabbitmqctl close_all_connections` does to every client at once, limited to
    the connections this test opened (named by `?name=` in its URL), so others sharing
    the broker are left alone; `AMQP_TEST_CLOSE_ALL=1` closes every connection on the
    broker instead, as an operator would; so does CI (`CI=true`), which has the broker to
    itself. Returns how many of this test's closed."""
    name = parse_qs(urlsplit(amqp_url).query)["name"][0]
    if os.environ.get("AMQP_TEST_CLOSE_ALL") == "1" or os.environ.get("CI") == "true":
        mine = await rabbitmqctl(
            "list_connections", "-q", "--no-table-headers", "client_properties"
        )
        await rabbitmqctl("close_all_connections", "test: closed on purpose")
        return sum(f'{{"connection_name","{name}"}}' in line for line in mine.splitlines())
    listing = await rabbitmqctl(
        "list_connections", "-q", "--no-table-headers", "pid", "client_properties"
    )
    pids = [
        line.split("\t", 1)[0]
        for line in listing.splitlines()
        if f'{{"connection_name","{name}"}}' in line
    ]
    await asyncio.gather(
        *(rabbitmqctl("close_connection", pid, "test: closed on purpose") for pid in pids)
    )
    return len(pids)


@given(st.floats(min_value=0.0005, max_value=7 * 24 * 3600))
def test_delay_hops_are_never_early_few_and_late_by_less_than_the_shortest_level(
    wait: float,
) -> None:
    # what a job goes through: a level, back to work, the rest of the wait, again...
    waited_ms, hops, left = 0, 0, wait
    while (level := delay_level(left)) is not None:
        waited_ms += level
        left = wait - waited_ms / 1000
        hops += 1
    assert waited_ms >= wait * 1000, "never early"
    assert waited_ms - wait * 1000 < DELAY_LEVELS_MS[0], "late by less than 10 ms"
    longest = DELAY_LEVELS_MS[-1] / 1000
    assert hops <= 3 * len(DELAY_LEVELS_MS) + int(wait // longest), "a few hops per level"


def test_a_due_job_waits_in_no_delay_queue() -> None:
    assert delay_level(0.0) is None
    assert delay_level(-5.0) is None


async def test_enqueue_of_a_known_id_stores_a_second_copy(queue: JobQueue) -> None:
    # No dedupe on a broker (see proxy/jobs/amqp_queue.py): both copies run, and the
    # handlers' idempotency makes the second a no-op upstream.
    assert await queue.enqueue(Job(type="t", payload={"v": 1}, id="dup")) is True
    assert await queue.enqueue(Job(type="t", payload={"v": 2}, id="dup")) is True
    first, second = await queue.take("w", 30.0), await queue.take("w", 30.0)
    assert first is not None and second is not None
    assert [first.payload, second.payload] == [{"v": 1}, {"v": 2}]
    assert await queue.depth() == 2


async def test_a_process_that_only_enqueues_holds_no_jobs(amqp_url: str) -> None:
    # the consumer starts at the first take: an API replica with `workers: false`
    # must not sit on prefetched jobs it will never run
    producer = await open_queue(amqp_url)
    worker = await open_queue(amqp_url)
    try:
        for n in range(20):
            await producer.enqueue(Job(type="t", payload={}, id=f"j{n}"))
        taken = [await take_within(worker, 5.0) for _ in range(20)]
        assert sorted(job.id for job in taken) == sorted(f"j{n}" for n in range(20))
    finally:
        await producer.close()
        await worker.close()


async def test_delayed_job_waits_on_the_broker_until_run_at(queue: JobQueue) -> None:
    start = time.time()
    await queue.enqueue(Job(type="t", payload={}, id="later", run_at=start + 1.0))
    assert await queue.take("w", 30.0) is None
    assert await queue.depth() == 1, "a delayed job is owed"

    taken = await take_within(queue, 5.0)
    waited = time.time() - start
    assert taken.id == "later"
    assert 1.0 <= waited < 4.0, f"taken after {waited:.2f}s, due after 1s"


async def test_retried_job_comes_back_after_its_backoff_with_one_more_attempt(
    queue: JobQueue,
) -> None:
    await queue.enqueue(Job(type="t", payload={}, id="j1"))
    taken = await queue.take("w", 30.0)
    assert taken is not None
    failed_at = time.time()
    await queue.retry(taken, "ConnectionError: refused", failed_at + 0.7)
    assert await queue.take("w", 30.0) is None

    again = await take_within(queue, 5.0)
    waited = time.time() - failed_at
    assert (again.attempts, again.last_error) == (1, "ConnectionError: refused")
    assert 0.7 <= waited < 3.7, f"back after {waited:.2f}s, due after 0.7s"


async def test_a_short_backoff_is_not_held_up_behind_a_long_one(queue: JobQueue) -> None:
    # one TTL per delay queue: the 5-minute job ahead cannot block the 0.3-second one
    now = time.time()
    await queue.enqueue(Job(type="t", payload={}, id="slow", run_at=now + 300))
    await queue.enqueue(Job(type="t", payload={}, id="fast", run_at=now + 0.3))
    assert (await take_within(queue, 4.0)).id == "fast"
    assert await queue.depth() == 2


async def test_depth_and_oldest_age_include_delayed_jobs(queue: JobQueue) -> None:
    now = time.time()
    await queue.enqueue(Job(type="t", payload={}, id="old", created_at=now - 30, run_at=now + 60))
    await queue.enqueue(Job(type="t", payload={}, id="new"))
    assert await queue.depth() == 2
    age = await queue.oldest_age()
    assert age is not None and 30 <= age < 35


async def test_job_of_a_worker_whose_connection_died_is_redelivered(amqp_url: str) -> None:
    dying = await open_queue(amqp_url)
    await dying.enqueue(Job(type="capture", payload={"amount": 5}, id="orphan"))
    taken = await dying.take("worker-a", 300.0)  # a long lease: only the death frees it
    assert taken is not None
    survivor = await open_queue(amqp_url)  # opened after: nothing was pushed to it before
    try:
        assert await survivor.take("worker-b", 300.0) is None

        await dying.close()  # the worker dies mid-job: its connection goes, no ack

        redelivered = await take_within(survivor, 5.0)
        assert (redelivered.id, redelivered.payload) == ("orphan", {"amount": 5})
        await survivor.ack(redelivered)
        assert await survivor.depth() == 0
    finally:
        await survivor.close()


async def test_open_on_an_unreachable_broker_is_unavailable_and_names_no_password() -> None:
    with pytest.raises(QueueUnavailable) as raised:
        await open_queue("amqp://guest:s3cret-pw@127.0.0.1:1/%2F?timeout=2s")
    assert "s3cret-pw" not in str(raised.value)
    assert "amqp://guest:***@127.0.0.1:1/%2F" in str(raised.value)


async def test_enqueue_while_the_connection_is_down_fails_then_works_again(
    queue: JobQueue, amqp_url: str
) -> None:
    assert isinstance(queue, AmqpQueue)
    assert await close_all_connections(amqp_url) == 1
    # the robust connection is back within about a second; until then enqueue refuses
    # promptly (the caller keeps what it owes) instead of hanging or losing the job
    outcomes: list[str] = []
    async with asyncio.timeout(15):
        while True:
            try:
                await queue.enqueue(Job(type="t", payload={}, id=f"j{len(outcomes)}"))
            except QueueUnavailable as exc:
                assert "guest:guest" not in str(exc)
                outcomes.append("unavailable")
                await asyncio.sleep(0.1)
                continue
            outcomes.append("stored")
            break
    stored = len(outcomes) - 1
    assert outcomes[-1] == "stored"
    assert await queue.depth() == 1, f"{stored} refused enqueues stored nothing"


async def test_a_lease_lost_with_the_connection_comes_back_and_its_late_ack_is_a_noop(
    queue: JobQueue, amqp_url: str
) -> None:
    await queue.enqueue(Job(type="t", payload={}, id="j1"))
    lost = await queue.take("w", 300.0)
    assert lost is not None
    assert await close_all_connections(amqp_url) == 1

    again = await take_within(queue, 10.0)  # once the connection is back
    assert again.id == "j1"
    await queue.ack(lost)  # the old delivery is void: no error, and nothing acked
    assert await queue.depth() == 1
    await queue.ack(again)
    assert await queue.depth() == 0


async def test_every_job_runs_when_all_connections_are_closed_mid_run(amqp_url: str) -> None:
    """Producers keep what they owe while the broker is unreachable (they enqueue again),
    workers' unacked jobs come back: every job runs at least once."""
    producer = await open_queue(amqp_url)
    consumers = [await open_queue(amqp_url) for _ in range(2)]
    ran: Counter[str] = Counter()

    async def handler(job: Job) -> None:
        await asyncio.sleep(0.005)  # some work in flight when the connections go
        ran[job.id] += 1

    stop = asyncio.Event()
    workers = [
        Worker(
            queue,
            {"t": handler},
            default_policy=RetryPolicy(max_attempts=50, base=0.05, max=0.2),
            consumer=f"w{i}",
            poll_interval=0.02,
            concurrency=4,
        )
        for i, queue in enumerate(consumers)
    ]
    running = [asyncio.create_task(w.run(stop)) for w in workers]
    ids = [f"job-{n}" for n in range(300)]
    unavailable = 0

    closed = asyncio.Event()

    async def produce() -> None:
        nonlocal unavailable
        for n, job_id in enumerate(ids):
            if n == len(ids) // 2:  # the second half after the close: mid-run, however slow
                await closed.wait()
            while True:  # the caller (journal, recovery) enqueues again until accepted
                try:
                    await producer.enqueue(Job(type="t", payload={}, id=job_id))
                    break
                except QueueUnavailable:
                    unavailable += 1
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.01)

    try:
        producing = asyncio.create_task(produce())
        await eventually(lambda: _ran_some(ran, 30), seconds=20)
        assert await close_all_connections(amqp_url) == 3
        assert not producing.done(), "the connections must close mid-run"
        closed.set()
        await producing

        async def all_ran() -> bool:
            return set(ran) == set(ids)

        await eventually(all_ran, seconds=40)
    finally:
        stop.set()
        await asyncio.gather(*running, return_exceptions=True)
        for queue in [producer, *consumers]:
            with contextlib.suppress(Exception):
                await queue.close()
    assert set(ran) == set(ids)
    duplicates = sum(count - 1 for count in ran.values())
    print(f"{len(ids)} jobs ran; {duplicates} ran twice; {unavailable} enqueues refused")


async def _ran_some(ran: Counter[str], n: int) -> bool:
    return len(ran) >= n
