"""Bulkhead: cap the calls in flight to one upstream.

A slow upstream holds connections, memory and the caller's deadline; without a cap
it can soak up every worker of the sidecar and starve the healthy upstreams. The
bulkhead refuses at once past `max_concurrent` (the default: no queue, because a
queued call mostly spends its deadline waiting), or, with `max_queue` > 0, lets a
few callers wait in FIFO order for at most their remaining deadline.

A freed slot is handed straight to the oldest waiter, so a newcomer calling
`try_acquire()` cannot overtake the queue. A waiter that gives up (timeout or
cancellation) at the very moment a slot is handed to it passes the slot on, so no
slot is ever lost. Only asyncio futures are used: no aiohttp, no clock, no sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BulkheadOptions:
    """Concurrency cap of one upstream and how many callers may queue behind it."""

    max_concurrent: int = 100
    max_queue: int = 0

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent!r}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue!r}")


class Bulkhead:
    """Counts the calls in flight to one upstream; `release()` once per granted slot."""

    def __init__(self, options: BulkheadOptions | None = None) -> None:
        self.options = options if options is not None else BulkheadOptions()
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def in_flight(self) -> int:
        """Slots taken, including slots handed to waiters that have not resumed yet."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Callers waiting for a slot."""
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a slot if one is free now; never waits, never queues."""
        if self._in_flight < self.options.max_concurrent and not self._waiters:
            self._in_flight += 1
            return True
        return False

    async def acquire(self, timeout: float | None) -> bool:
        """Take a slot, waiting in FIFO order for at most `timeout` seconds if allowed.

        `timeout` is the caller's remaining deadline (None: no limit). Refuses at once
        when the queue is full or the deadline already passed. Cancellation of the
        caller propagates; a slot it was handed meanwhile goes to the next waiter.
        """
        if self.try_acquire():
            return True
        if len(self._waiters) >= self.options.max_queue or (timeout is not None and timeout <= 0):
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            self._abandon(waiter)
            return False
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        return True

    def release(self) -> None:
        """Give a slot back; the oldest waiter, if any, gets it directly."""
        if self._in_flight <= 0:
            raise RuntimeError("Bulkhead.release() without a matching acquire")
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter; in_flight stays
                return
        self._in_flight -= 1

    def _abandon(self, waiter: asyncio.Future[None]) -> None:
        """A waiter gave up: leave the queue, or pass on a slot it was just handed."""
        if waiter.done() and not waiter.cancelled():
            self.release()
            return
        waiter.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
