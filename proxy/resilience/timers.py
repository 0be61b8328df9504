"""Per-try timeouts on one loop timer: each attempt's timer is an entry in a heap.

Every attempt runs under a timer that cancels it when its per-try budget runs out,
and almost every attempt finishes long before. A loop timer per attempt
(`loop.call_at`, then `cancel`) is a libuv timer started and stopped on uvloop:
about 8k instructions of a proxied request's ~340k (callgrind). Here starting a
timer is a push on a heap (new entries are nearly always the latest, so the push
stops at once), stopping it is a flag, and one loop timer is armed for the earliest
entry; it is moved only when an earlier entry comes.

An entry fires at its own time, as `call_at` would: the loop timer is armed for the
earliest entry, and when it goes off every entry due by then is fired. Stopped
entries stay in the heap until they reach its top or outnumber the live ones
(then the heap is rebuilt from the live ones), so memory follows the attempts in
flight, not the request rate.
"""

from __future__ import annotations

import asyncio
import itertools
from heapq import heapify, heappop, heappush
from math import inf
from typing import Any

Entry = list[Any]
"""`[task, fired]`: the attempt's task (None once stopped or fired), and whether it fired.

A list rather than an object: made on every attempt, and a list costs a fraction of
an instance with an `__init__`."""

_TASK = 0
_FIRED = 1


class PerTryTimers:
    """The per-try timers of one event loop (`loop`): `start`, then `stop` or fire.

    A fired entry cancels its task, as `asyncio.timeout` does; the attempt tells
    that cancellation from any other by what `stop(entry)` returns.
    """

    __slots__ = ("_armed_at", "_handle", "_heap", "_live", "_order", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._heap: list[tuple[float, int, Entry]] = []
        self._order = itertools.count()  # ties fire in start order; entries never compared
        self._live = 0
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = inf

    def start(self, when: float, task: asyncio.Task[Any]) -> Entry:
        """Cancel `task` at loop time `when` unless `stop` comes first."""
        entry: Entry = [task, False]
        heappush(self._heap, (when, next(self._order), entry))
        self._live += 1
        if when < self._armed_at:
            self._arm(when)
        return entry

    def stop(self, entry: Entry) -> bool:
        """The attempt ended: its timer will not fire. True if it fired already (its
        cancellation is on the task, to be taken back or turned into a timeout)."""
        if entry[_TASK] is None:
            return bool(entry[_FIRED])
        entry[_TASK] = None
        self._live -= 1
        heap = self._heap
        if len(heap) > 64 and len(heap) > 4 * self._live:
            live = [item for item in heap if item[2][_TASK] is not None]
            heapify(live)
            self._heap = live
        return False

    def __len__(self) -> int:
        """Timers started and neither stopped nor fired."""
        return self._live

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self.loop.call_at(when, self._fire)
        self._armed_at = when

    def _fire(self) -> None:
        # everything due by the armed time fires, as its own call_at handle would have,
        # even if the loop's clock reads a hair earlier than that time
        due = max(self._armed_at, self.loop.time())
        self._handle = None
        self._armed_at = inf
        heap = self._heap
        while heap and heap[0][0] <= due:
            entry = heappop(heap)[2]
            task = entry[_TASK]
            if task is not None:
                entry[_TASK] = None
                entry[_FIRED] = True
                self._live -= 1
                task.cancel()
        while heap and heap[0][2][_TASK] is None:
            heappop(heap)  # stopped ones at the top: no wake-up for them
        if heap:
            self._arm(heap[0][0])
