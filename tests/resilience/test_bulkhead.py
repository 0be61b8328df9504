"""Bulkhead behaviour on a real event loop; waits end by release or short timeouts."""

from __future__ import annotations

import asyncio

import pytest

from proxy.resilience.bulkhead import Bulkhead, BulkheadOptions


async def settle() -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(5):
        await asyncio.sleep(0)


def full(max_concurrent: int = 1, max_queue: int = 0) -> Bulkhead:
    bulkhead = Bulkhead(BulkheadOptions(max_concurrent=max_concurrent, max_queue=max_queue))
    for _ in range(max_concurrent):
        assert bulkhead.try_acquire()
    return bulkhead


@pytest.mark.parametrize("bad", [{"max_concurrent": 0}, {"max_queue": -1}])
def test_invalid_options_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        BulkheadOptions(**bad)


def test_101st_call_refused_at_once() -> None:
    bulkhead = Bulkhead(BulkheadOptions(max_concurrent=100))
    assert all(bulkhead.try_acquire() for _ in range(100))
    assert not bulkhead.try_acquire()
    assert bulkhead.in_flight == 100


async def test_acquire_without_queue_refuses_at_once() -> None:
    bulkhead = full(max_concurrent=100, max_queue=0)
    assert await bulkhead.acquire(timeout=10.0) is False
    assert bulkhead.queued == 0


def test_release_frees_a_slot() -> None:
    bulkhead = full(max_concurrent=2)
    bulkhead.release()
    assert bulkhead.in_flight == 1
    assert bulkhead.try_acquire()


def test_release_without_acquire_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        Bulkhead().release()


async def test_queue_is_fifo() -> None:
    bulkhead = full(max_concurrent=1, max_queue=3)
    order: list[int] = []

    async def waiter(n: int) -> None:
        assert await bulkhead.acquire(timeout=10.0)
        order.append(n)

    tasks = []
    for n in range(3):
        tasks.append(asyncio.create_task(waiter(n)))
        await settle()
    assert bulkhead.queued == 3
    for _ in range(3):
        bulkhead.release()
        await settle()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert bulkhead.in_flight == 1  # the last waiter holds the slot


async def test_freed_slot_goes_to_waiter_not_newcomer() -> None:
    bulkhead = full(max_concurrent=1, max_queue=1)
    waiting = asyncio.create_task(bulkhead.acquire(timeout=10.0))
    await settle()
    bulkhead.release()
    assert not bulkhead.try_acquire()  # the slot is already the waiter's
    assert await waiting
    assert bulkhead.in_flight == 1


async def test_full_queue_refuses_at_once() -> None:
    bulkhead = full(max_concurrent=1, max_queue=1)
    waiting = asyncio.create_task(bulkhead.acquire(timeout=10.0))
    await settle()
    assert await bulkhead.acquire(timeout=10.0) is False
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)


async def test_queue_timeout_gives_up() -> None:
    bulkhead = full(max_concurrent=1, max_queue=1)
    assert await bulkhead.acquire(timeout=0.01) is False
    assert bulkhead.queued == 0
    assert bulkhead.in_flight == 1


async def test_expired_deadline_refuses_without_queueing() -> None:
    bulkhead = full(max_concurrent=1, max_queue=1)
    assert await bulkhead.acquire(timeout=0.0) is False
    assert bulkhead.queued == 0


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    bulkhead = full(max_concurrent=1, max_queue=2)
    cancelled = asyncio.create_task(bulkhead.acquire(timeout=10.0))
    await settle()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert bulkhead.queued == 0
    bulkhead.release()
    assert bulkhead.in_flight == 0
    assert bulkhead.try_acquire()


async def test_waiter_cancelled_after_being_handed_a_slot_passes_it_on() -> None:
    bulkhead = full(max_concurrent=1, max_queue=2)
    first = asyncio.create_task(bulkhead.acquire(timeout=10.0))
    await settle()
    second = asyncio.create_task(bulkhead.acquire(timeout=10.0))
    await settle()
    bulkhead.release()  # the slot is handed to `first`...
    first.cancel()  # ...which is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second  # the slot moved on
    assert bulkhead.in_flight == 1
    bulkhead.release()
    assert bulkhead.in_flight == 0


async def test_waiter_cancelled_after_slot_handed_with_nobody_behind_frees_it() -> None:
    bulkhead = full(max_concurrent=1, max_queue=1)
    waiting = asyncio.create_task(bulkhead.acquire(timeout=10.0))
    await settle()
    bulkhead.release()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert bulkhead.in_flight == 0
    assert bulkhead.try_acquire()


async def test_many_cancellations_never_leak() -> None:
    bulkhead = full(max_concurrent=2, max_queue=50)
    served: list[int] = []

    async def worker(n: int) -> None:
        assert await bulkhead.acquire(timeout=10.0)
        served.append(n)
        await asyncio.sleep(0)
        bulkhead.release()

    tasks = [asyncio.create_task(worker(n)) for n in range(20)]
    await settle()
    for n in range(1, 20, 2):
        tasks[n].cancel()
    bulkhead.release()
    bulkhead.release()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert served == list(range(0, 20, 2))
    assert (bulkhead.in_flight, bulkhead.queued) == (0, 0)
