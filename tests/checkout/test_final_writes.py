"""`FinalWrites`: the final writes of answered checkouts, waited for by id and at close."""

from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.checkout.final_writes import FinalWrites


async def test_a_wait_returns_once_the_write_has_ended_and_then_it_is_forgotten() -> None:
    writes = FinalWrites()
    land = asyncio.Event()
    landed: list[str] = []

    async def write() -> bool:
        await land.wait()
        return True

    writes.start("chk_1", write(), landed=lambda: landed.append("chk_1"))
    assert "chk_1" in writes and len(writes) == 1
    waiter = asyncio.create_task(writes.wait("chk_1"))
    other = asyncio.create_task(writes.wait("chk_2"))  # none in flight: returns at once
    await other
    assert not waiter.done()
    land.set()
    await waiter
    assert landed == ["chk_1"] and "chk_1" not in writes and len(writes) == 0


async def test_a_failed_write_is_logged_and_still_calls_landed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writes = FinalWrites()
    landed = asyncio.Event()

    async def write() -> None:
        raise ConnectionError("the store went away")

    with caplog.at_level(logging.WARNING, logger="proxy.checkout"):
        writes.start("chk_1", write(), landed=landed.set)
        await writes.wait("chk_1")
        await landed.wait()
    assert "chk_1" not in writes
    assert "recovery finishes it" in caplog.text and "the store went away" in caplog.text


async def test_drain_waits_for_every_write_in_flight() -> None:
    writes = FinalWrites()
    land = asyncio.Event()
    done: list[str] = []

    async def write(name: str) -> None:
        await land.wait()
        done.append(name)

    for name in ("a", "b"):
        writes.start(name, write(name))
    drain = asyncio.create_task(writes.drain())
    await asyncio.wait([drain], timeout=0)
    assert not drain.done()
    land.set()
    await drain
    assert sorted(done) == ["a", "b"] and len(writes) == 0


async def test_a_wait_is_bounded_when_a_write_hangs() -> None:
    writes = FinalWrites()
    hang = asyncio.Event()
    writes.start("chk_1", hang.wait())
    await writes.wait("chk_1", limit=0.01)  # returns although the write still runs
    assert "chk_1" in writes
    hang.set()
    await writes.drain()
