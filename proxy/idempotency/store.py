"""The idempotency store: what every backend promises.

The guard needs exactly three atomic operations on a key: claim it (or learn who
has it), complete it with the response, or give an unused claim back. Keeping the
protocol that small is what lets `memory://`, `sqlite://` and `redis://` be
swapped by a config line and tested by one behavioural suite. The backend a URL names
is opened by `proxy.storage.open.open_idempotency_store`.
"""

from __future__ import annotations

import base64
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from proxy.storage.errors import StoreUnavailable
from proxy.storage.joint import JointInsert


class IdempotencyStoreUnavailable(StoreUnavailable):
    """The store could not be reached or refused to work (Redis down, SQLite locked).

    The guard fails closed on it: a request whose key cannot be recorded is not run.
    """

    kind = "idempotency store"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A final response as it is kept for replay; `body` is the exact bytes sent."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe form; the body goes as base64 so any bytes survive."""
        return {
            "status": self.status,
            "headers": [[name, value] for name, value in self.headers],
            "body": base64.b64encode(self.body).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoredResponse:
        return cls(
            status=int(data["status"]),
            headers=[(str(name), str(value)) for name, value in data["headers"]],
            body=base64.b64decode(data["body"]),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> StoredResponse:
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True, slots=True)
class KeptResponse(StoredResponse):
    """A `run`'s response that is already the key's stored answer: the work wrote it in
    its own final transaction (`JointCompletes`), so the guard does not store it again."""


class ClaimState(enum.Enum):
    """What `claim` found for a key."""

    CLAIMED = "claimed"  # the caller owns the key now and must run the request
    IN_PROGRESS = "in_progress"  # someone else is running it
    MISMATCH = "mismatch"  # the key was used for a different payload
    COMPLETED = "completed"  # done before; `response` is to be replayed


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """The answer to a claim; `retry_after` (seconds) is set for IN_PROGRESS.

    `joint` is True when a `JointClaims.claim_joint` also inserted its `JointInsert`
    (in the claim's transaction); False for every other claim.
    """

    state: ClaimState
    retry_after: float = 0.0
    response: StoredResponse | None = None
    joint: bool = False

    @classmethod
    def claimed(cls) -> ClaimResult:
        return cls(ClaimState.CLAIMED)

    @classmethod
    def in_progress(cls, retry_after: float) -> ClaimResult:
        return cls(ClaimState.IN_PROGRESS, retry_after=max(0.0, retry_after))

    @classmethod
    def mismatch(cls) -> ClaimResult:
        return cls(ClaimState.MISMATCH)

    @classmethod
    def completed(cls, response: StoredResponse) -> ClaimResult:
        return cls(ClaimState.COMPLETED, response=response)


@runtime_checkable
class IdempotencyStore(Protocol):
    """Atomic per-key records: in progress (with a lease) or completed (with a TTL).

    Every method raises `StoreUnavailable` when the backend cannot answer; none
    caches a broken connection, so the next call after an outage tries afresh.
    """

    name: str
    """The store URL with secrets removed, for error bodies and logs."""

    async def claim(self, key: str, fingerprint: str, in_progress_ttl: float) -> ClaimResult:
        """Record `key` as in progress unless a live record exists; atomic across callers.

        An existing record with another fingerprint is a MISMATCH whatever its state.
        """
        ...

    async def complete(
        self, key: str, fingerprint: str, response: StoredResponse, ttl: float
    ) -> None:
        """Replace the claim with the final response, kept for `ttl` seconds."""
        ...

    async def abandon(self, key: str) -> None:
        """Drop an in-progress claim whose request never ran; completed records stay."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class JointClaims(Protocol):
    """An idempotency store that can commit another store's first row with a claim.

    Optional (SQLite, PostgreSQL, Redis): the guard uses it when the store `accepts` the
    insert (same database; on Redis, same server, db and hash tag, one Lua script),
    and otherwise claims as usual and lets the caller write the row itself.
    """

    def accepts(self, insert: JointInsert) -> bool:
        """Whether `insert` goes to this store's database, so `claim_joint` can run it."""
        ...

    async def claim_joint(
        self, key: str, fingerprint: str, in_progress_ttl: float, insert: JointInsert
    ) -> ClaimResult:
        """`claim`, and when the key is CLAIMED, `insert` in the same transaction.

        The result's `joint` says whether the insert added its row (False: the row was
        there already). If the insert fails, the claim is rolled back with it and
        `StoreUnavailable` is raised: neither row exists.
        """
        ...


@runtime_checkable
class JointCompletes(Protocol):
    """An idempotency store whose `complete` another store can run in its transaction.

    Optional (SQLite, PostgreSQL, Redis): the checkout's final journal write then keeps the
    key's answer too, one transaction instead of two, when the journal `accepts` it.
    """

    def joint_complete(
        self, key: str, fingerprint: str, response: StoredResponse, ttl: float
    ) -> tuple[JointInsert, ...]:
        """`complete(...)` as statements for another store's transaction, not run."""
        ...


def in_progress_record(fingerprint: str) -> dict[str, Any]:
    """The record a claim writes; shared by the serialising backends."""
    return {"state": "in_progress", "fingerprint": fingerprint}


def completed_record(fingerprint: str, response: StoredResponse) -> dict[str, Any]:
    return {"state": "completed", "fingerprint": fingerprint, "response": response.to_dict()}


def result_for_existing(
    record: Mapping[str, Any], fingerprint: str, remaining: float
) -> ClaimResult:
    """Turn a live record found by a failed claim into the caller's answer."""
    if record.get("fingerprint") != fingerprint:
        return ClaimResult.mismatch()
    if record.get("state") == "completed":
        return ClaimResult.completed(StoredResponse.from_dict(record["response"]))
    return ClaimResult.in_progress(remaining)
