"""One upstream: its pooled client session, its pipeline, and its attempt.

Everything that turns a socket event into an `Outcome` lives here, so the
pipeline above never sees an aiohttp exception and every caller (the proxy route,
the composite checkout) gets the same classification.
"""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import ClientResponse, ClientSession, TCPConnector
from multidict import CIMultiDict
from yarl import URL

from proxy.config import Upstream as UpstreamConfig
from proxy.forward import SMALL_BODY, has_small_body
from proxy.policies import Policies
from proxy.resilience.backoff import BackoffOptions
from proxy.resilience.breaker import is_failure
from proxy.resilience.clock import Clock, monotonic
from proxy.resilience.deadline import HEADER as TIMEOUT_HEADER
from proxy.resilience.deadline import Deadline
from proxy.resilience.fallback import CachedResponse, FallbackAnswer
from proxy.resilience.outcome import Kind, Outcome
from proxy.resilience.pipeline import CallResult, Pipeline, PipelineHooks
from proxy.resilience.retry import RETRY_AFTER_STATUSES, RetryOptions, parse_retry_after


def classify_error(exc: BaseException) -> Outcome:
    """Map a client exception to the outcome kind that retry and breaker reason about."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return Outcome(Kind.CONNECT_FAILURE, detail="connect timeout")
    if isinstance(exc, aiohttp.SocketTimeoutError | aiohttp.ServerTimeoutError):
        return Outcome(Kind.TIMEOUT, detail="read timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Outcome(Kind.CONNECT_FAILURE, detail=str(exc.os_error.strerror or exc))
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return Outcome(Kind.RESET, detail="server closed the connection without a response")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return Outcome(Kind.RESET, detail="response body broken off")
    if isinstance(exc, aiohttp.ClientOSError):
        if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
            return Outcome(Kind.CONNECT_FAILURE, detail=exc.strerror or str(exc))
        return Outcome(Kind.RESET, detail=exc.strerror or "connection reset")
    if isinstance(exc, ConnectionError):
        return Outcome(Kind.RESET, detail=str(exc) or type(exc).__name__)
    return Outcome(Kind.RESET, detail=f"{type(exc).__name__}: {exc}")


def retry_options(config: UpstreamConfig) -> RetryOptions:
    backoff = config.retry.backoff
    return RetryOptions(
        attempts=config.retry.attempts,
        backoff=BackoffOptions(backoff.base, backoff.multiplier, backoff.max, backoff.jitter),
        conditions=config.retry.conditions,
        statuses=config.retry.statuses,
    )


async def discard_response(outcome: Outcome) -> None:
    """Let go of a response we will not pass on; read a small body so the connection is kept."""
    response: ClientResponse | None = outcome.response
    if response is None:
        return
    if response._body is None:
        response.close()
    else:
        response.release()


_STALE_HEADERS = frozenset({"content-type", "content-encoding", "etag", "last-modified"})

_LABEL_OF_KIND = {
    Kind.TIMEOUT: "timeout",
    Kind.CIRCUIT_OPEN: "circuit_open",
    Kind.BULKHEAD_FULL: "bulkhead_full",
    Kind.CONNECT_FAILURE: "error",
    Kind.RESET: "error",
}


def outcome_label(result: CallResult, fallback: FallbackAnswer | None) -> str:
    """The `outcome` label of sidecar_requests_total for a finished call."""
    if fallback is not None:
        return "fallback"
    outcome = result.outcome
    if outcome.kind is Kind.RESPONSE:
        return "ok" if outcome.status < 500 else "error"
    return _LABEL_OF_KIND[outcome.kind]


@dataclass(slots=True)
class OutgoingRequest:
    """A request ready to be attempted (once, or again when `body` is bytes)."""

    method: str
    url: str | URL
    headers: CIMultiDict[str]
    body: bytes | AsyncIterator[bytes] | None = None


class Upstream:
    """A named upstream with its own connection pool and resilience pipeline."""

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        *,
        hooks: PipelineHooks | None = None,
        clock: Clock = monotonic,
        rng: random.Random | None = None,
        previous: Policies | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.base_url = config.url
        self.clock = clock
        self.hooks = hooks or PipelineHooks()
        self._session: ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.timeout.connect, connect=None
        )
        hooks_ = self.hooks
        self.policies = Policies.build(
            config,
            clock,
            on_transition=lambda old, new: hooks_.breaker_transition(name, old, new),
            previous=previous,
        )
        failure_on = config.breaker.failure_on
        self.pipeline = Pipeline(
            name,
            per_try=config.timeout.per_try,
            retry=retry_options(config),
            breaker=self.policies.breaker,
            bulkhead=self.policies.bulkhead,
            budget=self.policies.budget,
            is_failure=lambda outcome: is_failure(outcome, failure_on),
            discard=discard_response,
            hooks=self.hooks,
            clock=clock,
            rng=rng,
        )

    @property
    def session(self) -> ClientSession:
        if self._session is None:
            connector = TCPConnector(
                limit=self.config.pool.max_connections,
                limit_per_host=0,
                keepalive_timeout=self.config.pool.keepalive,
                enable_cleanup_closed=False,
                ttl_dns_cache=300,
            )
            self._session = ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),
                raise_for_status=False,
            )
            # aiohttp silently re-sends an idempotent request once when a pooled
            # connection breaks; that would be an attempt the pipeline cannot see or
            # count, so the pipeline's own retry (which can) is the only one.
            self._session._retry_connection = False
        return self._session

    def deadline(self, requested: float | None = None) -> Deadline:
        """This upstream's deadline for a call, shortened by the caller's own budget."""
        return Deadline.for_call(self.config.timeout.total, requested, self.clock)

    async def call(
        self, request: OutgoingRequest, deadline: Deadline, *, retryable: bool
    ) -> CallResult:
        """Send `request` through the pipeline; the result's response body is unread if large."""
        session = self.session
        headers = request.headers
        timeout = self._timeout

        async def attempt(number: int, seconds: float) -> Outcome:
            headers[TIMEOUT_HEADER] = Deadline.header_value(seconds)
            try:
                response = await session.request(
                    request.method,
                    request.url,
                    headers=headers,
                    data=request.body,
                    allow_redirects=False,
                    timeout=timeout,
                )
                if has_small_body(response):
                    await response.read()
            except (aiohttp.ClientError, OSError) as exc:
                return classify_error(exc)
            retry_after = None
            if response.status in RETRY_AFTER_STATUSES:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            return Outcome(Kind.RESPONSE, response.status, response, retry_after)

        return await self.pipeline.call(attempt, deadline, retryable=retryable)

    def fallback_for(self, result: CallResult, method: str, key: str) -> FallbackAnswer | None:
        """The configured fallback for a call that failed, or None to report the failure."""
        fallback = self.policies.fallback
        if fallback is None or not result.failed:
            return None
        answer = fallback.answer(result.reason, key, method)
        if answer is None and result.exhausted and result.attempts > 1:
            answer = fallback.answer("retries_exhausted", key, method)
        if answer is not None:
            self.hooks.fallback_served(self.name, answer.reason, answer.source)
        return answer

    def remember_good(self, method: str, key: str, response: ClientResponse) -> None:
        """Keep a good, fully read GET response for stale-if-error."""
        fallback = self.policies.fallback
        if (
            fallback is not None
            and method == "GET"
            and 200 <= response.status < 300
            and response._body is not None
        ):
            headers = [(k, v) for k, v in response.headers.items() if k.lower() in _STALE_HEADERS]
            fallback.store_good(key, CachedResponse(response.status, headers, response._body))

    def finished(self, result: CallResult, fallback: FallbackAnswer | None) -> None:
        """Report the call's end once, with the outcome the caller actually got."""
        self.hooks.request_finished(self.name, outcome_label(result, fallback), result.elapsed)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class UpstreamRegistry:
    """The upstreams of one config, by name."""

    def __init__(self, upstreams: Mapping[str, Upstream]) -> None:
        self._by_name = dict(upstreams)

    def get(self, name: str) -> Upstream | None:
        return self._by_name.get(name)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_name.values())

    def names(self) -> list[str]:
        return list(self._by_name)

    async def close(self) -> None:
        await asyncio.gather(*(u.close() for u in self._by_name.values()))


__all__ = ["SMALL_BODY", "OutgoingRequest", "Upstream", "UpstreamRegistry", "classify_error"]
