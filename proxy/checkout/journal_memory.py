"""`memory://`: the checkout journal of this process only, for tests and throwaway runs."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from cachetools import TTLCache

from proxy.checkout.journal import (
    DEFAULT_TTL,
    FINAL,
    Change,
    CheckoutRecord,
    Cursor,
    EditingJournal,
    EventsIf,
    OutboxEvent,
    WallClock,
    json_copy,
    new_record_data,
)
from proxy.storage.joint import JointInsert

T = TypeVar("T")

DEFAULT_MAXSIZE = 100_000
"""At most this many final records are kept (unfinished ones are never dropped)."""


class MemoryJournal(EditingJournal):
    """Records of this process only, for tests and throwaway runs.

    Operations never await between reading and writing a record, which is what makes
    them atomic on one event loop. Unfinished records live in a plain dict (never
    dropped); final ones move to a bounded TTL cache driven by the wall clock.
    """

    def __init__(
        self,
        *,
        ttl: float = DEFAULT_TTL,
        maxsize: int = DEFAULT_MAXSIZE,
        wall: WallClock = time.time,
    ) -> None:
        self.name = "memory://"
        self.ttl = ttl
        self._wall = wall
        self._unfinished: dict[str, dict[str, Any]] = {}
        self._final: TTLCache[str, dict[str, Any]] = TTLCache(maxsize=maxsize, ttl=ttl, timer=wall)
        self._outbox: dict[str, OutboxEvent] = {}  # insertion order: oldest first

    def _find(self, checkout_id: str) -> dict[str, Any] | None:
        data = self._unfinished.get(checkout_id)
        return data if data is not None else self._final.get(checkout_id)

    def _file(self, data: dict[str, Any]) -> None:
        """Keep the record in the place its state calls for (final ones expire)."""
        checkout_id = data["id"]
        if data["state"] == FINAL:
            was_unfinished = self._unfinished.pop(checkout_id, None) is not None
            if was_unfinished or checkout_id not in self._final:  # the ttl starts now
                self._final[checkout_id] = data
        else:
            self._final.pop(checkout_id, None)
            self._unfinished[checkout_id] = data

    async def create(self, record: CheckoutRecord) -> bool:
        data = new_record_data(record, self._wall())
        if self._find(data["id"]) is not None:
            return False
        self._file(data)
        return True

    async def get(self, checkout_id: str) -> CheckoutRecord | None:
        data = self._find(checkout_id)
        return None if data is None else CheckoutRecord.from_dict(json_copy(data))

    async def _change(
        self,
        checkout_id: str,
        change: Change[T],
        events: EventsIf | None = None,
        also: Sequence[JointInsert] = (),
    ) -> T:
        if also:
            raise ValueError("the memory journal runs no other store's statements")
        data = self._find(checkout_id)
        if data is None:
            raise KeyError(checkout_id)
        result = change(data, self._wall())
        self._file(data)  # a change of state moves the record
        for event in events(result) if events is not None else ():
            self._outbox.setdefault(event.id, event)
        return result

    async def unsent_events(self, limit: int = 100) -> list[OutboxEvent]:
        return list(itertools.islice(self._outbox.values(), max(limit, 0)))

    async def mark_events_sent(self, ids: Iterable[str]) -> None:
        for event_id in ids:
            self._outbox.pop(event_id, None)

    async def outbox_pending(self) -> int:
        return len(self._outbox)

    async def unfinished(
        self, older_than: float, limit: int = 100, after: Cursor | None = None
    ) -> list[CheckoutRecord]:
        cutoff = self._wall() - older_than
        found = sorted(
            (
                data
                for data in self._unfinished.values()
                if data["created_at"] <= cutoff
                and (after is None or (data["created_at"], data["id"]) > after)
            ),
            key=lambda data: (data["created_at"], data["id"]),
        )
        return [CheckoutRecord.from_dict(json_copy(data)) for data in found[: max(limit, 0)]]

    async def close(self) -> None:
        self._unfinished.clear()
        self._final.clear()
        self._outbox.clear()
