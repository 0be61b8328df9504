"""The one error every durable store raises when its backend cannot answer.

Callers (the idempotency guard, the checkout, the job worker) catch `StoreUnavailable`
for every store alike; each store's subclass only changes the words, so a log line says
which store failed. `store` is the redacted URL, safe for clients and logs.
"""

from __future__ import annotations

from typing import ClassVar


class StoreUnavailable(Exception):
    """The store could not be reached or refused to work (Redis down, SQLite locked)."""

    kind: ClassVar[str] = "store"

    def __init__(self, store: str, detail: str = "") -> None:
        self.store = store
        self.detail = detail
        super().__init__(f"{self.kind} {store} is unavailable" + (f": {detail}" if detail else ""))
