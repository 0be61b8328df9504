"""`BatchThread`: calls run in order on one thread, results and errors come back to
their callers, cancelled calls are skipped, and a shut-down thread refuses new calls."""

from __future__ import annotations

import asyncio
import threading

import pytest

from proxy.storage.batch_thread import BatchThread


async def test_calls_run_in_order_on_one_thread_of_its_own() -> None:
    runner = BatchThread("test-batch")
    seen: list[tuple[int, str]] = []

    def call(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * 2

    try:
        results = await asyncio.gather(*(runner.run(lambda i=i: call(i)) for i in range(50)))
    finally:
        runner.shutdown()
    assert results == [i * 2 for i in range(50)]
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"test-batch"}
    assert threading.current_thread().name != "test-batch"


async def test_an_error_reaches_its_caller_only() -> None:
    runner = BatchThread("test-batch")

    def boom() -> int:
        raise ValueError("no")

    try:
        ok, failed = await asyncio.gather(
            runner.run(lambda: 1), runner.run(boom), return_exceptions=True
        )
        assert await runner.run(lambda: 3) == 3
    finally:
        runner.shutdown()
    assert ok == 1
    assert isinstance(failed, ValueError)


async def test_a_call_cancelled_before_it_started_is_skipped() -> None:
    runner = BatchThread("test-batch")
    release = threading.Event()
    ran: list[str] = []
    try:
        first = runner.run(lambda: release.wait(10))  # holds the thread
        second = runner.run(lambda: ran.append("second"))
        second.cancel()
        release.set()
        assert await first is True
        assert await runner.run(lambda: "after") == "after"  # the queue went on
    finally:
        runner.shutdown()
    assert ran == []


async def test_after_shutdown_new_calls_are_refused_and_queued_ones_finish() -> None:
    runner = BatchThread("test-batch")
    release = threading.Event()
    held = runner.run(lambda: release.wait(10))
    queued = runner.run(lambda: "queued")
    runner.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        runner.run(lambda: None)
    release.set()
    assert await held is True
    assert await queued == "queued"
