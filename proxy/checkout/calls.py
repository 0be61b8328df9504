"""One JSON call of the checkout, through the upstream's pipeline like every other call.

The checkout is a client of the same pipeline as the proxied routes (deadline,
bulkhead, breaker, retry); this module only turns a rendered call into an
`OutgoingRequest` and the pipeline's result into what the saga reasons about:
did the upstream act (`ok`), refuse (`refused`, a 4xx), or might it have acted
without us knowing (`ambiguous`: a timeout, reset or 5xx after the request left)?
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict
from yarl import URL

from proxy.checkout.plan import RenderedCall
from proxy.resilience.deadline import Deadline
from proxy.resilience.fallback import FallbackAnswer
from proxy.resilience.outcome import Kind
from proxy.upstreams import OutgoingRequest, Upstream, discard_response

NEVER_SENT = frozenset({Kind.CIRCUIT_OPEN, Kind.BULKHEAD_FULL, Kind.CONNECT_FAILURE})


@dataclass
class CallOutcome:
    """How a checkout call ended, in the terms of the saga."""

    http_status: int | None
    body: Any
    attempts: int
    latency_ms: float
    reason: str  # ok, refused, timeout, reset, upstream_5xx, circuit_open, ...
    retry_after: float | None = None
    fallback: FallbackAnswer | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.http_status is not None and 200 <= self.http_status < 300

    @property
    def refused(self) -> bool:
        """The upstream answered and said no (out of stock, card declined)."""
        return self.http_status is not None and 400 <= self.http_status < 500

    @property
    def ambiguous(self) -> bool:
        """The request may have acted upstream without our learning of it.

        A timeout, a reset, a 500, 502 or 504 may come after the upstream acted. A 503
        is the upstream shedding load before it acts (RFC 9110 15.6.4), so it counts
        as "did not act": treating it as ambiguous would make every outage a wave of
        re-sent authorizations that then have to be voided.
        """
        if self.ok or self.refused or self.http_status == 503:
            return False
        return self.reason not in ("circuit_open", "bulkhead_full", "connect_failure", "skipped")


async def call_json(
    upstream: Upstream,
    call: RenderedCall,
    key: str,
    deadline: Deadline,
    *,
    extra_headers: dict[str, str] | None = None,
    with_fallback: bool = False,
) -> CallOutcome:
    """Send one JSON call with its own Idempotency-Key and read the JSON answer."""
    headers: CIMultiDict[str] = CIMultiDict(call.headers)
    headers["Idempotency-Key"] = key
    headers.setdefault("Accept", "application/json")
    if extra_headers:
        headers.update(extra_headers)
    data = None
    if call.body is not None:
        data = json.dumps(call.body, separators=(",", ":")).encode()
        headers["Content-Type"] = "application/json"
    request = OutgoingRequest(
        call.method, URL(upstream.base_url + call.path, encoded=True), headers, data
    )
    result = await upstream.call(request, deadline, retryable=True)
    try:
        outcome = result.outcome
        answer = upstream.fallback_for(result, call.method, call.path) if with_fallback else None
        upstream.finished(result, answer)
        latency_ms = round(result.elapsed * 1000, 1)
        if not outcome.is_response:
            return CallOutcome(
                None,
                None,
                result.attempts,
                latency_ms,
                outcome.reason,
                retry_after=outcome.retry_after,
                fallback=answer,
            )
        body: Any = None
        try:
            async with asyncio.timeout(max(deadline.remaining(), 0.001)):
                raw = await outcome.response.read()
            body = json.loads(raw) if raw else None
        except TimeoutError:
            return CallOutcome(None, None, result.attempts, latency_ms, "timeout", fallback=answer)
        except (ValueError, UnicodeDecodeError):
            body = None
        except Exception:
            return CallOutcome(None, None, result.attempts, latency_ms, "reset", fallback=answer)
        status = outcome.status
        reason = "ok" if status < 400 else "refused" if status < 500 else "upstream_5xx"
        return CallOutcome(
            status, body, result.attempts, latency_ms, reason, outcome.retry_after, answer
        )
    finally:
        await discard_response(result.outcome)
        result.release()


def fallback_body(answer: FallbackAnswer) -> Any:
    try:
        return json.loads(answer.body) if answer.body else None
    except ValueError:
        return answer.body.decode(errors="replace")


UpstreamLookup = Callable[[str], Upstream | None]
