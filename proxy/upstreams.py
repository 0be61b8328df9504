"""One upstream: its pooled client session, its pipeline, and its attempt.

Everything that turns a socket event into an `Outcome` lives here, so the
pipeline above never sees an aiohttp exception and every caller (the proxy route,
the composite checkout) gets the same classification.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import random
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import ClientRequest, ClientResponse, ClientSession, TCPConnector, hdrs
from aiohttp.helpers import EMPTY_BODY_METHODS, TimerNoop
from aiohttp.typedefs import LooseHeaders
from multidict import CIMultiDict, istr
from yarl import URL

from proxy.config.options import retry_options
from proxy.config.upstream import Upstream as UpstreamConfig
from proxy.forward import SMALL_BODY, has_small_body
from proxy.observability import tracing as _tracing
from proxy.policies import Policies
from proxy.resilience.breaker import is_failure
from proxy.resilience.clock import Clock, monotonic
from proxy.resilience.deadline import HEADER as TIMEOUT_HEADER
from proxy.resilience.deadline import Deadline
from proxy.resilience.fallback import CachedResponse, FallbackAnswer
from proxy.resilience.outcome import RESPONSE, Kind, Outcome
from proxy.resilience.pipeline import CallResult, Pipeline, PipelineHooks
from proxy.resilience.retry import RETRY_AFTER_STATUSES, parse_retry_after


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
    if outcome.kind is RESPONSE:
        return "ok" if outcome.status < 500 else "error"
    return _LABEL_OF_KIND[outcome.kind]


_NO_AUTO_HEADERS = ("User-Agent", "Accept-Encoding", "Accept", "Content-Type")
"""Headers aiohttp would add on its own; a proxy sends the caller's headers as they came."""
_NO_AUTO_HEADER_SET = frozenset(istr(name) for name in _NO_AUTO_HEADERS)
_NO_AUTO_HEADER_MAP: CIMultiDict[None] = CIMultiDict(
    (istr(name), None) for name in sorted(_NO_AUTO_HEADERS)
)
_EVERY_AUTO_HEADER_SKIPPED = {*ClientRequest.DEFAULT_HEADERS, hdrs.USER_AGENT} <= (
    _NO_AUTO_HEADER_SET
)


class VerbatimRequest(ClientRequest):
    """A `ClientRequest` that skips the work of headers it would not add anyway.

    The session skips every automatic header (`_NO_AUTO_HEADERS`), which sends
    aiohttp down its slow path on every request: a sorted copy of the skip list and
    a copy of the headers just to find out that nothing is to be added. Here that
    answer is known once, and the caller's headers (already a fresh copy made by
    the session) are taken with one C-level `extend` instead of a Python loop. The
    headers on the wire are the same: Host first, then the caller's, in order.
    """

    def update_headers(self, headers: LooseHeaders | None) -> None:
        if type(headers) is CIMultiDict and hdrs.HOST not in headers:
            host = self.url.host_port_subcomponent
            assert host is not None
            taken: CIMultiDict[str] = CIMultiDict()
            taken[hdrs.HOST] = host
            taken.extend(headers)
            self.headers = taken
            return
        super().update_headers(headers)

    def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
        if _EVERY_AUTO_HEADER_SKIPPED and skip_auto_headers == _NO_AUTO_HEADER_SET:
            # read only (membership tests for Content-Type), so one map serves all requests
            self._skip_auto_headers = _NO_AUTO_HEADER_MAP
            return
        super().update_auto_headers(skip_auto_headers)


_DIRECT_SCHEMES = frozenset({"http", "https"})


def _direct_ok(session: ClientSession) -> bool:
    """Whether `_direct_request` is exactly what `session.request` would do for us."""
    return (
        not session._trace_configs
        and not session._middlewares
        and not session._default_headers
        and not session._trust_env
        and session._default_auth is None
        and session._default_proxy is None
        and session._base_url is None
        and not session._retry_connection
        and isinstance(session.cookie_jar, aiohttp.DummyCookieJar)
        and session._raise_for_status is False
        and session.timeout.total is None
    )


async def _direct_request(
    session: ClientSession,
    method: str,
    url: URL,
    headers: CIMultiDict[str],
    data: bytes | AsyncIterator[bytes] | None,
    timeout: aiohttp.ClientTimeout,
) -> ClientResponse:
    """`session.request(..., allow_redirects=False)` minus what this proxy never uses.

    ClientSession._request spends ~20 us per call on features our sessions have
    off (`_direct_ok`): trace signals, cookie jar, auth, env proxies, redirect
    bookkeeping, a timer context for a total timeout we do not set, a Python
    loop copying the headers. This is its remaining path, step for step: build
    the request, take a pooled connection (a connect timeout is a
    ConnectionTimeoutError), send, read the status line and headers; errors are
    the ones it raises (an OSError becomes ClientOSError). Anything unusual (a
    URL with credentials, headers whose names repeat) goes to `session.request`.
    """
    if session.closed:
        raise RuntimeError("Session is closed")
    if url.raw_user is not None or url.raw_password is not None or not url.raw_host:
        return await session.request(
            method, url, headers=headers, data=data, allow_redirects=False, timeout=timeout
        )
    if len(set(headers.keys())) != len(headers):
        # repeated names: the session's header copy has its own merging rules
        headers = session._prepare_headers(headers)
    connector = session._connector
    assert connector is not None
    req = None
    try:
        req = session._request_class(
            method,
            url,
            headers=headers,
            skip_auto_headers=session._skip_auto_headers,
            data=data,
            version=session._version,
            loop=session._loop,
            response_class=session._response_class,
            timer=_NO_TIMER,
            session=session,
            ssl=True,
            traces=[],
        )
        try:
            conn = await connector.connect(req, traces=[], timeout=timeout)
        except TimeoutError as exc:
            raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host {req.url}") from exc
        protocol = conn.protocol
        assert protocol is not None
        protocol.set_response_params(
            timer=_NO_TIMER,
            skip_payload=req.method in EMPTY_BODY_METHODS,
            read_until_eof=True,
            auto_decompress=session._auto_decompress,
            read_timeout=timeout.sock_read,
            read_bufsize=session._read_bufsize,
            timeout_ceil_threshold=connector._timeout_ceil_threshold,
            max_line_size=session._max_line_size,
            max_field_size=session._max_field_size,
            max_headers=session._max_headers,
        )
        try:
            response = await req.send(conn)
            try:
                await response.start(conn)
            except BaseException:
                response.close()
                raise
        except BaseException:
            conn.close()
            raise
    except aiohttp.ClientError:
        await _close_body(req)
        raise
    except OSError as exc:
        await _close_body(req)
        if exc.errno is None and isinstance(exc, asyncio.TimeoutError):
            raise
        raise aiohttp.ClientOSError(*exc.args) from exc
    except BaseException:
        await _close_body(req)
        raise
    await _close_body(req)
    return response


async def _close_body(req: ClientRequest | None) -> None:
    if req is not None and req._body is not None:
        await req._body.close()


_NO_TIMER = TimerNoop()


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
        self._direct = False  # whether `_direct_request` may stand in for session.request
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
                skip_auto_headers=_NO_AUTO_HEADERS,
                request_class=VerbatimRequest,
                cookie_jar=aiohttp.DummyCookieJar(),
                raise_for_status=False,
            )
            # aiohttp silently re-sends an idempotent request once when a pooled
            # connection breaks; that would be an attempt the pipeline cannot see or
            # count, so the pipeline's own retry (which can) is the only one.
            self._session._retry_connection = False
            # what `_direct_request` leaves out must be what this session would not do
            self._direct = _direct_ok(self._session)
        return self._session

    def deadline(self, requested: float | None = None) -> Deadline:
        """This upstream's deadline for a call, shortened by the caller's own budget."""
        return Deadline.for_call(self.config.timeout.total, requested, self.clock)

    async def call(
        self, request: OutgoingRequest, deadline: Deadline, *, retryable: bool
    ) -> CallResult:
        """Send `request` through the pipeline; the result's response body is unread if large."""
        # a partial, not a closure: fewer objects per call; the session is the call's own
        # (a retry after close() fails like the first attempt would, never reopens one)
        send = self._attempt
        tracing = _tracing.TRACING
        if tracing.enabled:
            if tracing.recording():
                send = self._traced_attempt
            else:
                # not sampled: pass the caller's context on without making spans of our own
                tracing.inject(request.headers)
        attempt = functools.partial(send, self.session, request)
        return await self.pipeline.call(attempt, deadline, retryable=retryable)

    async def _traced_attempt(
        self, session: ClientSession, request: OutgoingRequest, number: int, seconds: float
    ) -> Outcome:
        """An attempt in its own CLIENT span, whose context travels in traceparent."""
        tracing = _tracing.TRACING
        breaker = self.policies.breaker
        state = breaker.state if breaker is not None else "disabled"
        with tracing.client_span(
            self.name, request.method, str(request.url), number - 1, state
        ) as span:
            tracing.inject(request.headers)
            outcome = await self._attempt(session, request, number, seconds)
            span.set_attribute("sidecar.outcome", outcome.reason)
            if outcome.is_response:
                span.set_attribute("http.response.status_code", outcome.status)
                if outcome.status >= 500:
                    tracing.fail(span, f"HTTP {outcome.status}")
            else:
                tracing.fail(span, outcome.reason)
            return outcome

    async def _attempt(
        self, session: ClientSession, request: OutgoingRequest, number: int, seconds: float
    ) -> Outcome:
        """One attempt at `request` with `seconds` left for it, classified as an Outcome."""
        headers = request.headers
        headers[TIMEOUT_HEADER] = Deadline.header_value(seconds)
        try:
            url = request.url
            if type(url) is URL and self._direct and url.scheme in _DIRECT_SCHEMES:
                response = await _direct_request(
                    session, request.method, url, headers, request.body, self._timeout
                )
            else:
                response = await session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=request.body,
                    allow_redirects=False,
                    timeout=self._timeout,
                )
            if has_small_body(response):
                await response.read()
        except (aiohttp.ClientError, OSError) as exc:
            return classify_error(exc)
        retry_after = None
        if response.status in RETRY_AFTER_STATUSES:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return Outcome(RESPONSE, response.status, response, retry_after)

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

    def remember_good(
        self, method: str, key: str, response: ClientResponse, *, personal: bool = False
    ) -> None:
        """Keep a good, fully read GET response for stale-if-error.

        Never one that belongs to someone: a request with credentials (`personal`)
        or a response marked private, no-store or varying by request headers could
        otherwise be served to another caller when the upstream fails.
        """
        fallback = self.policies.fallback
        if (
            fallback is None
            or not fallback.options.stale
            or personal
            or method != "GET"
            or not 200 <= response.status < 300
            or response._body is None
        ):
            return
        headers = response.headers
        control = headers.get("Cache-Control", "").lower()
        if "Vary" in headers or "private" in control or "no-store" in control:
            return
        kept = [(k, v) for k, v in headers.items() if k.lower() in _STALE_HEADERS]
        fallback.store_good(key, CachedResponse(response.status, kept, response._body))

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
