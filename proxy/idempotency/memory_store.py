"""`memory://`: idempotency records in this process only, for tests and throwaway runs.

A bounded cache so a flood of keys cannot exhaust memory; under that pressure the
least recently used records go first, which is acceptable only because this
backend promises nothing beyond one process's lifetime. Each record carries its
own expiry (claims and completed responses live for different times), hence a
cachetools `TLRUCache` (the per-item-TTL sibling of `TTLCache`), driven by the
injected clock so tests advance time instead of sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cachetools import TLRUCache

from proxy.idempotency.store import (
    ClaimResult,
    StoredResponse,
    completed_record,
    in_progress_record,
    result_for_existing,
)
from proxy.resilience.clock import Clock, monotonic

DEFAULT_MAXSIZE = 10_000


@dataclass(slots=True)
class _Entry:
    record: dict[str, Any]
    expires_at: float


def _entry_expiry(_key: str, entry: _Entry, _now: float) -> float:
    return entry.expires_at


class MemoryStore:
    """Process-local store; atomic because claims never await between check and set."""

    def __init__(self, *, maxsize: int = DEFAULT_MAXSIZE, clock: Clock = monotonic) -> None:
        self.name = "memory://"
        self._clock = clock
        self._entries: TLRUCache[str, _Entry] = TLRUCache(
            maxsize=maxsize, ttu=_entry_expiry, timer=clock
        )

    async def claim(self, key: str, fingerprint: str, in_progress_ttl: float) -> ClaimResult:
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None:
            return result_for_existing(entry.record, fingerprint, entry.expires_at - now)
        self._entries[key] = _Entry(in_progress_record(fingerprint), now + in_progress_ttl)
        return ClaimResult.claimed()

    async def complete(
        self, key: str, fingerprint: str, response: StoredResponse, ttl: float
    ) -> None:
        self._entries[key] = _Entry(completed_record(fingerprint, response), self._clock() + ttl)

    async def abandon(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.record["state"] == "in_progress":
            del self._entries[key]

    async def close(self) -> None:
        self._entries.clear()
