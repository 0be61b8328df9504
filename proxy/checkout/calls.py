"""One JSON call of the checkout, through the upstream's pipeline like every other call.

The checkout is a client of the same pipeline as the proxied routes (deadline,
bulkhead, breaker, retry); this module only turns a rendered call into an
`OutgoingRequest` and the pipeline's result into what the saga reasons about:
did the upstream act (`ok`), refuse (`refused`, a 4xx), or might it have acted
without us knowing (`ambiguous`: a timeout, reset or 5xx after the request left)?
And, for a step's `resolve` read, what its answer says the lost call did
(`resolution`).
"""

from __future__ import annotations

import asyncio
import enum
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDict
from yarl import URL

from proxy import jsoncodec
from proxy.checkout.plan import RenderedCall
from proxy.client import OutgoingRequest
from proxy.resilience.deadline import Deadline
from proxy.resilience.fallback import FallbackAnswer
from proxy.resilience.rules import is_refusal
from proxy.upstreams import Upstream


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
        """The upstream answered and said no (out of stock, card declined): `rules.is_refusal`."""
        return is_refusal(self.http_status, self.retry_after)

    @property
    def ambiguous(self) -> bool:
        """The request may have acted upstream without our learning of it: any attempt
        of the call ended in a timeout, a reset, or a 500/502/504 (a 503 sheds load
        before acting, RFC 9110 15.6.4), and the call did not end in an answer."""
        return self.maybe_acted and not self.ok and not self.refused


class Verdict(enum.StrEnum):
    """What a resolve read says about a step whose answer was lost."""

    ACTED = "acted"  # the body says what the step did: compensate that
    NOT_ACTED = "not_acted"  # nothing under the step's key: nothing to undo
    UNKNOWN = "unknown"  # the read failed or said nothing usable: ask again later


@dataclass(frozen=True)
class Resolution:
    verdict: Verdict
    body: Any = None
    why: str = ""


NOT_FOUND = frozenset({404, 410})
"""Statuses by which a resolve read says nothing was done under the key."""


def resolution(outcome: CallOutcome) -> Resolution:
    """Read the answer of a step's `resolve` (a GET by the step's Idempotency-Key).

    - 404 or 410: the upstream has nothing under the key: the step never acted.
    - 2xx with a JSON object: it acted, and the object is what it did (the answer the
      step's request would have had: compensate templates read `steps.<step>.body`
      from it).
    - 2xx with a JSON array (a search): `[]` never acted; `[x]` acted, as `x`.
    - Anything else is UNKNOWN, never a guess: a read that failed (timeout, reset,
      5xx, open breaker), another 4xx (a misconfigured read proves nothing), several
      results under one key (the upstream acted more than once: a person must look),
      or a 2xx body that is none of the above.
    """
    status, body = outcome.http_status, outcome.body
    if status in NOT_FOUND:
        return Resolution(Verdict.NOT_ACTED, why=f"{status}")
    if not outcome.ok:
        return Resolution(Verdict.UNKNOWN, why=f"read failed: {status or outcome.reason}")
    if isinstance(body, dict):
        return Resolution(Verdict.ACTED, body)
    if isinstance(body, list):
        if not body:
            return Resolution(Verdict.NOT_ACTED, why="empty list")
        if len(body) == 1 and isinstance(body[0], dict):
            return Resolution(Verdict.ACTED, body[0])
        return Resolution(
            Verdict.UNKNOWN, why=f"{len(body)} results under one key: the upstream acted twice?"
        )
    return Resolution(Verdict.UNKNOWN, why="a 2xx without a JSON object or array")


async def call_json(
    upstream: Upstream,
    call: RenderedCall,
    key: str | None,
    deadline: Deadline,
    *,
    with_fallback: bool = False,
    hedge: bool = False,
) -> CallOutcome:
    """Send one JSON call with its own Idempotency-Key and read the JSON answer.

    `key` None sends no Idempotency-Key: a resolve read acts on nothing, and a key on
    it could make an upstream that stores keyed answers replay a stale "not found".
    `hedge` (a step's `hedge: true`) lets the call be hedged when the rules allow it
    for this method, key and upstream (`Upstream.may_hedge`).
    """
    headers: CIMultiDict[str] = CIMultiDict(call.headers)
    if key is not None:
        headers["Idempotency-Key"] = key
    headers.setdefault("Accept", "application/json")
    data = None
    if call.body is not None:
        data = jsoncodec.dumps_bytes(call.body)
        headers["Content-Type"] = "application/json"
    request = OutgoingRequest(
        call.method, URL(upstream.base_url + call.path, encoded=True), headers, data
    )
    fallback_key = call.path if with_fallback else None
    hedged = hedge and upstream.may_hedge(call.method, key is not None, True)
    async with upstream.call(
        request, deadline, retryable=True, fallback_key=fallback_key, hedge=hedged
    ) as result:
        outcome = result.outcome
        answer = result.fallback
        latency_ms = round(result.elapsed * 1000, 1)
        response = result.response
        if response is None:
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
                raw = await response.read()
            body = jsoncodec.loads(raw) if raw else None
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


def fallback_body(answer: FallbackAnswer) -> Any:
    try:
        return json.loads(answer.body) if answer.body else None
    except ValueError:
        return answer.body.decode(errors="replace")


UpstreamLookup = Callable[[str], Upstream | None]
