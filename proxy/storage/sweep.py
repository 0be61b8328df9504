"""When a store's sweep of expired rows rides along with one of its writes.

The SQL stores delete expired idempotency records and final journal records in
bounded batches, inside the transaction of a write they make anyway (a key's answer,
a checkout's final write), so no separate job is needed. One sweep per write was a
statement per checkout for each table that found nothing almost every time (records
live for hours); one sweep per `SWEEP_EVERY` keeps up with far more expirations than
a replica writes (`batch / SWEEP_EVERY` rows a second: 1,000 with a batch of 100) for
a fraction of the statements.
"""

from __future__ import annotations

SWEEP_EVERY = 0.1
"""Seconds, on the store's wall clock, between two sweeps of one store object."""


class Sweep:
    """Says, for each write, whether it should carry the sweep."""

    def __init__(self, every: float = SWEEP_EVERY) -> None:
        if every < 0:
            raise ValueError(f"every must not be negative, got {every}")
        self._every = every
        self._next: float | None = None

    def due(self, now: float) -> bool:
        """True at most once per `every` seconds; then the next one is `every` away.

        A clock stepped back by more than `every` (NTP) does not hold the sweep off
        until it catches up: the wait never exceeds `every` from `now`.
        """
        following = self._next
        if following is not None and now < following <= now + self._every:
            return False
        self._next = now + self._every
        return True
