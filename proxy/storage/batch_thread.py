"""One thread that runs blocking calls for asyncio, handed over in batches.

A SQLite file's transactions take tens of microseconds; `run_in_executor` costs more
than that on the event loop's side (a `concurrent.futures` future, locks, a wrapped
asyncio future, one wake-up of the loop per call), and under load that overhead was
the larger part of a store call. Here callers append to a list the thread drains whole:
while it is busy, a new call only appends (no wake-up), and the results of one pass go
back to each loop in one `call_soon_threadsafe`. Calls run one at a time in the order
they were made, as on a one-worker executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Item = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]
_Done = tuple["asyncio.Future[Any]", bool, Any]


class BatchThread:
    """Runs `fn()` calls on one thread of its own; `run` returns an asyncio future."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._items: list[_Item] = []
        self._cond = threading.Condition(threading.Lock())
        self._waiting = False  # the thread sleeps on `_cond` and must be woken
        self._shutdown = False
        self._thread: threading.Thread | None = None

    def run(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Queue `fn` and return the future of its result; RuntimeError once shut down.

        Cancelling the future before `fn` started skips it, as with an executor."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError(f"{self.name}: cannot run calls after shutdown")
            self._items.append((loop, future, fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            elif self._waiting:
                self._waiting = False
                self._cond.notify()
        return future

    def shutdown(self) -> None:
        """Refuse new calls; the thread ends after those already queued."""
        with self._cond:
            self._shutdown = True
            self._waiting = False
            self._cond.notify()

    # -- the thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    if self._shutdown:
                        return
                    self._waiting = True
                    self._cond.wait()
                batch, self._items = self._items, []
            self._run_batch(batch)

    @staticmethod
    def _run_batch(batch: list[_Item]) -> None:
        results: dict[asyncio.AbstractEventLoop, list[_Done]] = {}
        for loop, future, fn in batch:
            if future.cancelled():  # a read of a flag; the race is an executor's too
                continue
            try:
                done: _Done = (future, True, fn())
            except BaseException as exc:  # handed to the caller, whatever it is
                done = (future, False, exc)
            results.setdefault(loop, []).append(done)
        for loop, dones in results.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                loop.call_soon_threadsafe(_deliver, dones)


def _deliver(dones: list[_Done]) -> None:
    """On the loop: settle each future of a pass (skipping those cancelled since)."""
    for future, ok, value in dones:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
