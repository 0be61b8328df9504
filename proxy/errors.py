"""The sidecar's own error responses, built in one place.

When the sidecar itself answers instead of the upstream, the app gets JSON that
says who refused and why: `error` (a sentence for people), `upstream`, `reason`
(a stable word for code and dashboards) and `attempts`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from proxy.resilience.outcome import Kind, Outcome

STATUS_FOR_KIND = {
    Kind.TIMEOUT: 504,
    Kind.CONNECT_FAILURE: 502,
    Kind.RESET: 502,
    Kind.TLS_VERIFY_FAILED: 502,
    Kind.TLS_HANDSHAKE_FAILED: 502,
    Kind.CIRCUIT_OPEN: 503,
    Kind.BULKHEAD_FULL: 503,
    Kind.RATE_LIMITED: 429,  # the upstream's quota (as we keep it) is spent: come back later
    Kind.STORE_UNAVAILABLE: 503,  # the shared rate limit's store is down: fail closed
    Kind.RESPONSE: 502,
}

_SENTENCE = {
    Kind.TIMEOUT: "upstream did not answer in time",
    Kind.CONNECT_FAILURE: "could not connect to upstream",
    Kind.RESET: "upstream connection broke before a complete answer",
    Kind.TLS_VERIFY_FAILED: "upstream's TLS certificate could not be verified",
    Kind.TLS_HANDSHAKE_FAILED: "TLS handshake with upstream failed",
    Kind.CIRCUIT_OPEN: "upstream circuit breaker is open",
    Kind.BULKHEAD_FULL: "too many calls in flight to upstream",
    Kind.RATE_LIMITED: "upstream rate limit reached",
    Kind.STORE_UNAVAILABLE: "upstream rate limit cannot be checked",
    Kind.RESPONSE: "upstream failed",
}


def json_error(
    status: int,
    error: str,
    reason: str,
    *,
    upstream: str | None = None,
    attempts: int | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """A JSON error response in the sidecar's one shape."""
    body: dict[str, Any] = {"error": error, "reason": reason}
    if upstream is not None:
        body["upstream"] = upstream
    if attempts is not None:
        body["attempts"] = attempts
    body.update(extra)
    out_headers = {"X-Sidecar-Error": reason}
    if attempts is not None:
        out_headers["X-Sidecar-Attempts"] = str(attempts)
    if headers:
        out_headers.update(headers)
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=out_headers,
    )


def outcome_error(upstream: str, outcome: Outcome, attempts: int) -> web.Response:
    """The JSON error for a call that ended without an upstream response to pass on."""
    status = STATUS_FOR_KIND[outcome.kind]
    sentence = _SENTENCE[outcome.kind]
    if outcome.detail:
        sentence = f"{sentence}: {outcome.detail}"
    headers = None
    if outcome.retry_after:
        headers = {"Retry-After": str(max(1, math.ceil(outcome.retry_after)))}
    return json_error(
        status, sentence, outcome.reason, upstream=upstream, attempts=attempts, headers=headers
    )
