"""What one attempt at an upstream ended with.

Layers pass outcomes, not exceptions: the attempt classifies what happened on the
socket once, and retry, breaker, metrics and the error responder all read the same
value. The sidecar's own JSON errors are built from it in one place
(`proxy.errors`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Kind(enum.Enum):
    """How an attempt (or a refusal before any attempt) ended."""

    RESPONSE = "response"  # the upstream answered with a status line
    TIMEOUT = "timeout"  # per-try timeout or the call's deadline
    CONNECT_FAILURE = "connect_failure"  # refused, unreachable, connect timeout, DNS
    TLS_VERIFY_FAILED = "tls_verify_failed"  # the upstream's certificate is not trusted
    TLS_HANDSHAKE_FAILED = "tls_handshake_failed"  # any other TLS failure while connecting
    RESET = "reset"  # the connection broke after it was made
    CIRCUIT_OPEN = "circuit_open"  # refused by the breaker, no network call
    BULKHEAD_FULL = "bulkhead_full"  # refused by the bulkhead, no network call
    RATE_LIMITED = "rate_limited"  # no token within the deadline, no network call
    STORE_UNAVAILABLE = "store_unavailable"  # the shared rate limit could not be asked


RESPONSE = Kind.RESPONSE
"""`Kind.RESPONSE` as a plain module global: an enum member read through its class
costs several times a global read on Python 3.11, and this one is read on every call."""


@dataclass(slots=True)
class Outcome:
    """The result of an attempt; `response` is the live upstream response, if any.

    `response` is left unread so a large body can still be streamed to the client
    when this outcome turns out to be the final one.
    """

    kind: Kind
    status: int = 0
    response: Any = None
    retry_after: float | None = None  # seconds, from a Retry-After header
    detail: str = ""  # human text for logs and error bodies
    elapsed: float = 0.0  # seconds this attempt took

    @property
    def is_response(self) -> bool:
        return self.kind is RESPONSE

    @property
    def reason(self) -> str:
        """The label used in metrics, fallbacks and error bodies."""
        if self.kind is RESPONSE:
            return "upstream_5xx" if self.status >= 500 else "ok"
        return self.kind.value
