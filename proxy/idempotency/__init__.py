"""Idempotency-Key support: run a request once, replay its response to repeats.

`IdempotencyGuard` applies the protocol around a request;
`proxy.storage.open.open_idempotency_store(url)` picks the backend (`memory://`,
`sqlite:///path`, `redis://host:port/db`).
"""

from proxy.idempotency.guard import (
    RESULTS,
    IdempotencyGuard,
    KeyIdentity,
    NotRun,
    fingerprint,
    parse_key_header,
    scoped_key,
    to_web_response,
    validate_key,
)
from proxy.idempotency.store import (
    ClaimResult,
    ClaimState,
    IdempotencyStore,
    KeptResponse,
    StoredResponse,
)
from proxy.storage.errors import StoreUnavailable

__all__ = [
    "RESULTS",
    "ClaimResult",
    "ClaimState",
    "IdempotencyGuard",
    "IdempotencyStore",
    "KeptResponse",
    "KeyIdentity",
    "NotRun",
    "StoreUnavailable",
    "StoredResponse",
    "fingerprint",
    "parse_key_header",
    "scoped_key",
    "to_web_response",
    "validate_key",
]
