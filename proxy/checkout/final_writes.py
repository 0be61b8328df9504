"""The final journal writes of checkouts already answered, and who must wait for them.

A checkout whose inline commits or compensations all succeeded is answered before its
final write (`CheckoutFlow._run` says why that is safe). Until that write lands, this
process alone knows the answer was given: a repeat of the request, a poll and the
shutdown wait here for it, so within one process a repeat is replayed, never told the
key is still in progress. One instance is shared by every flow of the process (a reload
builds a new flow; the writes of the old one are still waited for).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("proxy.checkout")

WAIT_LIMIT = 10.0
"""Seconds a repeat or a poll waits for a final write in flight before reading anyway
(the store's own statement timeout ends a stuck write well before)."""


class FinalWrites:
    """The final writes in flight, by checkout id."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, checkout_id: object) -> bool:
        return checkout_id in self._tasks

    def start(
        self,
        checkout_id: str,
        write: Coroutine[Any, Any, Any],
        landed: Callable[[], None] = lambda: None,
    ) -> None:
        """Run `write` for `checkout_id`; `landed` is called once it has ended, whether
        it wrote or failed. A failed write leaves the record as its decision wrote it,
        and recovery finishes it like one a crash left."""
        task = asyncio.get_running_loop().create_task(write, name=f"final-write:{checkout_id}")
        self._tasks[checkout_id] = task

        def ended(task: asyncio.Task[Any]) -> None:
            if self._tasks.get(checkout_id) is task:
                del self._tasks[checkout_id]
            landed()
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.warning(
                    "checkout %s: its final write failed after its answer (%s);"
                    " recovery finishes it from its decision",
                    checkout_id,
                    exc,
                )

        task.add_done_callback(ended)

    async def wait(self, checkout_id: str, limit: float = WAIT_LIMIT) -> None:
        """Return once `checkout_id`'s final write (if one is in flight) has ended."""
        task = self._tasks.get(checkout_id)
        if task is not None:
            await asyncio.wait([task], timeout=limit)

    async def drain(self, limit: float = WAIT_LIMIT) -> None:
        """Wait for every final write in flight (at shutdown, before the stores close)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=limit)
