"""Idempotency by key, as real payment providers do it (Stripe, the IETF draft).

The first request with a key acts and its answer is stored; a repeat with the
same key and the same method, path and body gets that answer again without
acting; the same key with anything else is a client bug and gets 422. Keys are
per upstream, like separate providers. Errors the handler returns (a declined
card, an illegal transition) are stored too: a replay must not turn a "no" into
a "yes". Injected faults happen before the handler and are never stored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    fingerprint: str
    status: int
    body: Any


class KeyReused(Exception):
    """The key was first used for a different request."""


def fingerprint(method: str, path: str, body: bytes) -> str:
    """What makes two requests "the same": method, path and body (JSON compared by value)."""
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        canonical = body
    digest = hashlib.sha256()
    for part in (method.upper().encode(), path.encode(), canonical):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()


class IdempotencyStore:
    """Stored answers by (upstream, key). In memory: the simulator is a test double."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], StoredResponse] = {}

    def lookup(self, upstream: str, key: str, print_: str) -> StoredResponse | None:
        """The stored answer for a repeat, None for a first use; `KeyReused` on a mismatch."""
        stored = self._records.get((upstream, key))
        if stored is not None and stored.fingerprint != print_:
            raise KeyReused(key)
        return stored

    def store(self, upstream: str, key: str, print_: str, status: int, body: Any) -> None:
        self._records[(upstream, key)] = StoredResponse(print_, status, body)

    def keys(self) -> dict[str, list[str]]:
        """Every key seen, by upstream, in first-use order."""
        by_upstream: dict[str, list[str]] = {}
        for upstream, key in self._records:
            by_upstream.setdefault(upstream, []).append(key)
        return by_upstream

    def clear(self) -> None:
        self._records.clear()
