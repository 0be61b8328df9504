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
from proxy.upstreams import OutgoingRequest, Upstream, discard_response


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
    maybe_acted: bool = False  # some attempt ended in a way that may follow an upstream action

    @property
    def ok(self) -> bool:
        return self.http_status is not None and 200 <= self.http_status < 300

    @property
    def refused(self) -> bool:
        """The upstream answered and said no (out of stock, card declined).

        Not a refusal: 408, 425 and 429 (ask again later) and a 409 with Retry-After
        (the upstream's "this key is still being processed").
        """
        status = self.http_status
        if status is None or not 400 <= status < 500 or status in NOT_A_REFUSAL:
            return False
        return not (status == 409 and self.retry_after is not None)

    @property
    def ambiguous(self) -> bool:
        """The request may have acted upstream without our learning of it: any attempt
        of the call ended in a timeout, a reset, or a 500/502/504 (a 503 sheds load
        before acting, RFC 9110 15.6.4), and the call did not end in an answer."""
        return self.maybe_acted and not self.ok and not self.refused


NOT_A_REFUSAL = frozenset({408, 425, 429})


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
                maybe_acted=result.maybe_acted,
            )
        body: Any = None
        try:
            async with asyncio.timeout(max(deadline.remaining(), 0.001)):
                raw = await outcome.response.read()
            body = json.loads(raw) if raw else None
        except TimeoutError:
            return CallOutcome(
                None,
                None,
                result.attempts,
                latency_ms,
                "timeout",
                fallback=answer,
                maybe_acted=True,
            )
        except (ValueError, UnicodeDecodeError):
            body = None
        except Exception:
            return CallOutcome(
                None, None, result.attempts, latency_ms, "reset", fallback=answer, maybe_acted=True
            )
        status = outcome.status
        reason = "ok" if status < 400 else "refused" if status < 500 else "upstream_5xx"
        outcome_of_call = CallOutcome(
            status,
            body,
            result.attempts,
            latency_ms,
            reason,
            outcome.retry_after,
            answer,
            maybe_acted=result.maybe_acted,
        )
        if reason == "refused" and not outcome_of_call.refused:
            outcome_of_call.reason = "busy"  # 408/425/429, or a key still in progress
        return outcome_of_call
    finally:
        await discard_response(result.outcome)
        result.release()


def fallback_body(answer: FallbackAnswer) -> Any:
    try:
        return json.loads(answer.body) if answer.body else None
    except ValueError:
        return answer.body.decode(errors="replace")


UpstreamLookup = Callable[[str], Upstream | None]
