"""One upstream: its client pool, its pipeline, and the call that finishes itself.

`Upstream.call` is the only way to reach an upstream: the proxied route, the
checkout's steps, commits and compensations, and queued jobs all use it. It runs
the pipeline (deadline -> bulkhead -> breaker -> retry -> attempt) and returns an
`UpstreamCall` to be used as an async context manager, which owns everything the
call still holds: the bulkhead slot, the unread response body, the fallback
decision and the one `request_finished` report. Leaving the `async with` block
lets all of it go, so no caller can leak a slot or forget its metrics.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Iterator, Mapping
from types import TracebackType

from multidict import istr

from proxy.client import HttpClient, OutgoingRequest, UpstreamResponse
from proxy.client.http11 import Http11Client
from proxy.config.options import retry_options, tls_options
from proxy.config.upstream import Upstream as UpstreamConfig
from proxy.policies import Policies
from proxy.resilience.breaker import is_failure
from proxy.resilience.clock import Clock, monotonic
from proxy.resilience.deadline import HEADER as TIMEOUT_HEADER
from proxy.resilience.deadline import Deadline
from proxy.resilience.fallback import CachedResponse, FallbackAnswer
from proxy.resilience.outcome import RESPONSE, Kind, Outcome
from proxy.resilience.pipeline import AttemptFn, CallResult, Pipeline, PipelineHooks
from proxy.resilience.ratelimit import BucketStore
from proxy.resilience.rules import may_hedge
from proxy.tls import ClientTls


class UpstreamHooks(PipelineHooks):
    """The pipeline's events plus the one hook that sees the request: `wrap_attempt`.

    Tracing uses it to run each attempt in a CLIENT span and send `traceparent`;
    without tracing the attempt is returned as it is, at no cost.
    """

    def wrap_attempt(
        self, upstream: Upstream, request: OutgoingRequest, attempt: AttemptFn
    ) -> AttemptFn:
        return attempt


async def _let_go(outcome: Outcome) -> None:
    """The pipeline's `discard`: a response that a retry superseded is let go."""
    response: UpstreamResponse | None = outcome.response
    if response is not None:
        response.let_go()


_TIMEOUT_HEADER = istr(TIMEOUT_HEADER)
"""Set on every attempt: an `istr` spares the lowercasing and hashing of a plain name."""

_STALE_HEADERS = frozenset({"content-type", "content-encoding", "etag", "last-modified"})

_LABEL_OF_KIND = {
    Kind.TIMEOUT: "timeout",
    Kind.CIRCUIT_OPEN: "circuit_open",
    Kind.BULKHEAD_FULL: "bulkhead_full",
    Kind.RATE_LIMITED: "rate_limited",
    Kind.STORE_UNAVAILABLE: "store_unavailable",
    Kind.CONNECT_FAILURE: "error",
    Kind.RESET: "error",
    Kind.TLS_VERIFY_FAILED: "error",
    Kind.TLS_HANDSHAKE_FAILED: "error",
}


def outcome_label(outcome: Outcome, fallback: FallbackAnswer | None) -> str:
    """The `outcome` label of sidecar_requests_total for a finished call."""
    if fallback is not None:
        return "fallback"
    if outcome.kind is RESPONSE:
        return "ok" if outcome.status < 500 else "error"
    return _LABEL_OF_KIND[outcome.kind]


class UpstreamCall:
    """One call: run on entering its `async with` block, and what it still holds until
    the block ends (`Upstream.call` makes it; the block's `as` target is itself).

    `outcome` is how the call ended (its `response`, if any, may still have an unread
    body); `fallback` is the configured fallback's answer when the call failed and
    the caller asked for one (`fallback_key`), decided on first look so a caller that
    answers otherwise (a 413) serves none. One object for the call and its result:
    one allocation per call, not one to run it and another to hold what it gave.
    """

    __slots__ = (
        "_closed",
        "_deadline",
        "_fallback",
        "_fallback_decided",
        "_fallback_key",
        "_hedge",
        "_request",
        "_result",
        "_retryable",
        "upstream",
    )

    _result: CallResult  # set on entering the block: nothing to read before the call ran

    def __init__(
        self,
        upstream: Upstream,
        request: OutgoingRequest,
        deadline: Deadline,
        retryable: bool,
        fallback_key: str | None,
        hedge: bool,
    ) -> None:
        self.upstream = upstream
        self._request = request
        self._deadline = deadline
        self._retryable = retryable
        self._fallback_key = fallback_key
        self._hedge = hedge
        self._fallback: FallbackAnswer | None = None
        self._fallback_decided = False
        self._closed = True  # until the call has run: nothing to let go

    async def __aenter__(self) -> UpstreamCall:
        upstream = self.upstream
        request = self._request
        attempt = upstream.hooks.wrap_attempt(upstream, request, upstream.attempt_of(request))
        self._result = await upstream.pipeline.call(
            attempt, self._deadline, retryable=self._retryable, hedge=self._hedge
        )
        self._closed = False
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def outcome(self) -> Outcome:
        return self._result.outcome

    @property
    def response(self) -> UpstreamResponse | None:
        response: UpstreamResponse | None = self._result.outcome.response
        return response

    @property
    def attempts(self) -> int:
        return self._result.attempts

    @property
    def elapsed(self) -> float:
        return self._result.elapsed

    @property
    def maybe_acted(self) -> bool:
        """Some attempt may have acted upstream without our learning of it."""
        return self._result.maybe_acted

    @property
    def failed(self) -> bool:
        return self._result.failed

    @property
    def fallback(self) -> FallbackAnswer | None:
        """The fallback to serve instead of this failed call, or None."""
        if not self._fallback_decided:
            self._fallback = self._decide_fallback()
            self._fallback_decided = True
        return self._fallback

    def _decide_fallback(self) -> FallbackAnswer | None:
        upstream, result = self.upstream, self._result
        fallback = upstream.policies.fallback
        if fallback is None or self._fallback_key is None or not result.failed:
            return None
        answer = fallback.answer(result.reason, self._fallback_key, self._request.method)
        if answer is None and result.exhausted and result.attempts > 1:
            answer = fallback.answer("retries_exhausted", self._fallback_key, self._request.method)
        if answer is not None:
            upstream.hooks.fallback_served(upstream.name, answer.reason, answer.source)
        return answer

    def keep_for_stale(self, request_headers: Mapping[str, str] | None = None) -> None:
        """Keep this good, fully read GET answer for stale-if-error.

        Never one that belongs to someone: a request with credentials
        (`Authorization` or `Cookie` in `request_headers`) or a response marked
        private, no-store or varying by request headers could otherwise be served to
        another caller when the upstream fails.
        """
        fallback = self.upstream.policies.fallback
        if fallback is None or not fallback.options.stale:
            return  # the usual case, decided before looking at any header
        response = self.response
        if (
            self._fallback_key is None
            or self._request.method != "GET"
            or response is None
            or not 200 <= response.status < 300
            or response.body is None
        ):
            return
        if request_headers is not None and (
            "Authorization" in request_headers or "Cookie" in request_headers
        ):
            return
        headers = response.headers
        control = headers.get("Cache-Control", "").lower()
        if "Vary" in headers or "private" in control or "no-store" in control:
            return
        kept = [(k, v) for k, v in headers.items() if k.lower() in _STALE_HEADERS]
        fallback.store_good(
            self._fallback_key, CachedResponse(response.status, kept, response.body)
        )

    def close(self) -> None:
        """Report the call once, let go of the response, give the bulkhead slot back."""
        if self._closed:
            return
        self._closed = True
        result = self._result
        try:
            response = self.response
            if response is not None:
                response.let_go()
        finally:
            try:  # a telemetry hook that raises must not keep the slot or the connection
                fallback = self._fallback  # None unless the caller looked and one was served
                self.upstream.hooks.request_finished(
                    self.upstream.name, outcome_label(result.outcome, fallback), result.elapsed
                )
            finally:
                result.release()


class Upstream:
    """A named upstream with its own connection pool and resilience pipeline."""

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        *,
        hooks: UpstreamHooks | None = None,
        clock: Clock = monotonic,
        rng: random.Random | None = None,
        previous: Policies | None = None,
        client: HttpClient | None = None,
        buckets: BucketStore | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.base_url = config.url
        self._total = config.timeout.total  # read per call: a plain float, not a model's
        self.clock = clock
        self.hooks = hooks or UpstreamHooks()
        # TLS settings and their files, watched for rotation (None: plain, or system trust)
        self.tls = ClientTls(tls_options(config.tls)) if config.tls is not None else None
        self.client: HttpClient = client or Http11Client(
            connect_timeout=config.timeout.connect,
            max_connections=config.pool.max_connections,
            keepalive=config.pool.keepalive,
            tls=self.tls,
        )
        hooks_ = self.hooks
        self.policies = Policies.build(
            config,
            clock,
            on_transition=lambda old, new: hooks_.breaker_transition(name, old, new),
            previous=previous,
            name=name,
            buckets=buckets,
        )
        failure_on = config.breaker.failure_on
        self.pipeline = Pipeline(
            name,
            per_try=config.timeout.per_try,
            retry=retry_options(config),
            breaker=self.policies.breaker,
            bulkhead=self.policies.bulkhead,
            budget=self.policies.budget,
            limiter=self.policies.limiter,
            hedging=self.policies.hedging,
            is_failure=lambda outcome: is_failure(outcome, failure_on),
            discard=_let_go,
            hooks=self.hooks,
            clock=clock,
            rng=rng,
        )

    @property
    def breaker_state(self) -> str:
        breaker = self.policies.breaker
        return breaker.state if breaker is not None else "disabled"

    def deadline(self, requested: float | None = None) -> Deadline:
        """This upstream's deadline for a call, shortened by the caller's own budget."""
        return Deadline.for_call(self._total, requested, self.clock)

    def call(
        self,
        request: OutgoingRequest,
        deadline: Deadline,
        *,
        retryable: bool,
        fallback_key: str | None = None,
        hedge: bool = False,
    ) -> UpstreamCall:
        """Send `request` through the pipeline: `async with upstream.call(...) as call:`.

        `retryable` says whether the request may be sent twice (`rules.may_send_twice`),
        `hedge` whether two copies may be in flight at once (`may_hedge`); hedges go
        out only when this upstream has a `hedge:` section.
        `fallback_key` (the path, for stale-if-error) lets a failed call be answered
        by the upstream's fallback, as `call.fallback`; None means no fallback.
        """
        return UpstreamCall(self, request, deadline, retryable, fallback_key, hedge)

    def may_hedge(self, method: str, has_idempotency_key: bool, body_replayable: bool) -> bool:
        """Whether a request to this upstream may be hedged (`rules.may_hedge`)."""
        if self.policies.hedging is None:
            return False
        return may_hedge(method, has_idempotency_key, body_replayable, self.config.idempotency)

    def attempt_of(self, request: OutgoingRequest) -> AttemptFn:
        """One attempt at `request` with `seconds` left for it, told to the upstream."""
        client = self.client  # the call's own: a retry after close() fails, never reopens

        def attempt(number: int, seconds: float) -> Awaitable[Outcome]:
            # the client's coroutine itself, not one that awaits it: a frame less
            request.headers[_TIMEOUT_HEADER] = Deadline.header_value(seconds)
            return client.send(request)

        return attempt

    async def close(self) -> None:
        await self.client.close()


class UpstreamRegistry:
    """The upstreams of one config, by name."""

    def __init__(self, upstreams: Mapping[str, Upstream]) -> None:
        self._by_name = dict(upstreams)

    def get(self, name: str) -> Upstream | None:
        return self._by_name.get(name)

    def __iter__(self) -> Iterator[Upstream]:
        return iter(self._by_name.values())

    def names(self) -> list[str]:
        return list(self._by_name)

    async def close(self) -> None:
        await asyncio.gather(*(u.close() for u in self._by_name.values()))


__all__ = [
    "OutgoingRequest",
    "Upstream",
    "UpstreamCall",
    "UpstreamHooks",
    "UpstreamRegistry",
]
