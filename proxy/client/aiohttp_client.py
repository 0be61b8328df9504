"""The upstream client on aiohttp: a pooled `ClientSession` per upstream.

Everything aiohttp-specific lives here: its exceptions turned into `Outcome`s, its
response wrapped as an `UpstreamResponse`, and `_direct_request`, a copy of the
request path of aiohttp 3.14's `ClientSession._request` minus the features our
sessions have off. That copy reads about 25 private attributes, which is why
aiohttp is pinned to 3.14.x (pyproject.toml, and `tests/proxy/test_direct_client.py`
checks the pin); it saves about 20 us per request. Whether it stays, or an HTTP
client of our own replaces this module, is the performance issue's call: nothing
outside this module would change.

TLS: an upstream with a `tls:` section has a `ClientTls` whose current
`SSLContext` (and `server_name`) is passed with each request, on the fast path as
on `session.request`; aiohttp keys pooled connections by both, so a rotated client
certificate is used by new connections while open ones finish. A failed handshake
is classified apart from a failed connect: `tls_verify_failed` when the upstream's
certificate is not trusted (or not for that name), `tls_handshake_failed` for any
other TLS error while connecting.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
from collections.abc import AsyncIterator, Iterable

import aiohttp
from aiohttp import ClientRequest, ClientResponse, ClientSession, TCPConnector, hdrs
from aiohttp.helpers import EMPTY_BODY_METHODS, TimerNoop
from aiohttp.typedefs import LooseHeaders
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

from proxy.client.protocol import BrokenBody, OutgoingRequest
from proxy.resilience.outcome import RESPONSE, Kind, Outcome
from proxy.resilience.retry import parse_retry_after
from proxy.resilience.rules import RETRY_AFTER_STATUSES
from proxy.tls import ClientTls

SMALL_BODY = 64 * 1024
"""Bodies up to this size are read inside the attempt: one write instead of a chunk loop."""


def classify_error(exc: BaseException, *, tls: bool = False) -> Outcome:
    """Map a client exception to the outcome kind that retry and breaker reason about.

    `tls` says the request was to an `https://` URL: a connection reset while
    connecting then happened in the TLS handshake (a TCP connect is refused, not
    reset), typically a server that drops a client without the certificate it
    requires instead of sending an alert.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        # only a handshake verifies certificates; aiohttp's ClientConnectorCertificateError
        # is one too (and its str() is long)
        return Outcome(Kind.TLS_VERIFY_FAILED, detail=_verify_detail(exc))
    if isinstance(exc, aiohttp.ClientSSLError):
        # raised while connecting, so the request was never sent. A bare ssl.SSLError
        # later (a broken record mid-body) is a reset: the upstream may have acted.
        return Outcome(Kind.TLS_HANDSHAKE_FAILED, detail=_handshake_detail(exc))
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return Outcome(Kind.CONNECT_FAILURE, detail="connect timeout")
    if isinstance(exc, aiohttp.SocketTimeoutError | aiohttp.ServerTimeoutError):
        return Outcome(Kind.TIMEOUT, detail="read timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        if tls and isinstance(exc.os_error, ConnectionResetError | ConnectionAbortedError):
            return Outcome(
                Kind.TLS_HANDSHAKE_FAILED,
                detail="the upstream closed the connection during the TLS handshake",
            )
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


def _verify_detail(exc: ssl.SSLCertVerificationError) -> str:
    cause = (
        exc.certificate_error if isinstance(exc, aiohttp.ClientConnectorCertificateError) else exc
    )
    message = getattr(cause, "verify_message", None) or getattr(cause, "reason", None)
    return f"certificate verify failed: {message or cause}"


def _handshake_detail(exc: BaseException) -> str:
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    reason = getattr(cause, "reason", None)
    return str(reason) if reason else str(cause) or type(cause).__name__


class AiohttpResponse:
    """An aiohttp `ClientResponse` as an `UpstreamResponse`."""

    __slots__ = ("_response",)

    def __init__(self, response: ClientResponse) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def reason(self) -> str | None:
        return self._response.reason

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._response.headers

    @property
    def content_length(self) -> int | None:
        return self._response.content_length

    @property
    def body(self) -> bytes | None:
        return self._response._body  # set once read whole; aiohttp has no public flag

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientError, OSError) as exc:
            raise BrokenBody(classify_error(exc)) from exc

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(size):
                yield chunk
        except (aiohttp.ClientError, OSError) as exc:
            raise BrokenBody(classify_error(exc)) from exc

    def let_go(self) -> None:
        response = self._response
        if response._body is None and not response.content.at_eof():
            response.close()
        else:
            response.release()


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
_NO_TIMER = TimerNoop()


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
    ssl_context: ssl.SSLContext | bool = True,
    server_hostname: str | None = None,
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
    `ssl_context` and `server_hostname` are the public per-request arguments of
    the same names (`ssl=`), passed on as they are.
    """
    if session.closed:
        raise RuntimeError("Session is closed")
    if url.raw_user is not None or url.raw_password is not None or not url.raw_host:
        return await session.request(
            method,
            url,
            headers=headers,
            data=data,
            allow_redirects=False,
            timeout=timeout,
            ssl=ssl_context,
            server_hostname=server_hostname,
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
            ssl=ssl_context,
            traces=[],
            server_hostname=server_hostname,
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


def _has_small_body(response: ClientResponse) -> bool:
    """Whether the upstream body is known to be small enough to read whole."""
    length = response.content_length
    return (length is not None and length <= SMALL_BODY) or response.status in (204, 304)


class AiohttpClient:
    """An `HttpClient` over one aiohttp session, opened on first use.

    `tls` (an upstream's `tls:` section, loaded) gives the context and server name
    of `https://` requests; without it they are verified against the system store.
    """

    def __init__(
        self,
        *,
        connect_timeout: float,
        max_connections: int,
        keepalive: float,
        tls: ClientTls | None = None,
    ) -> None:
        self._tls = tls
        self._max_connections = max_connections
        self._keepalive = keepalive
        self._session: ClientSession | None = None
        self._closed = False
        self._direct = False  # whether `_direct_request` may stand in for session.request
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, connect=None
        )

    @property
    def session(self) -> ClientSession:
        if self._session is None:
            connector = TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                keepalive_timeout=self._keepalive,
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

    async def send(self, request: OutgoingRequest) -> Outcome:
        if self._closed:
            # a retry after close() fails like the first attempt would, never reopens a pool
            return Outcome(Kind.CONNECT_FAILURE, detail="the upstream's pool is closed")
        session = self.session
        try:
            url = request.url
            ssl_context: ssl.SSLContext | bool = True
            server_hostname = None
            tls = self._tls
            if tls is not None and url.scheme == "https":
                ssl_context = tls.context()
                server_hostname = tls.server_name
            if self._direct and url.scheme in _DIRECT_SCHEMES:
                response = await _direct_request(
                    session,
                    request.method,
                    url,
                    request.headers,
                    request.body,
                    self._timeout,
                    ssl_context,
                    server_hostname,
                )
            else:
                response = await session.request(
                    request.method,
                    url,
                    headers=request.headers,
                    data=request.body,
                    allow_redirects=False,
                    timeout=self._timeout,
                    ssl=ssl_context,
                    server_hostname=server_hostname,
                )
            if _has_small_body(response):
                await response.read()
        except (aiohttp.ClientError, OSError) as exc:
            return classify_error(exc, tls=request.url.scheme == "https")
        except RuntimeError:
            if not session.closed:
                raise
            return Outcome(Kind.CONNECT_FAILURE, detail="the upstream's pool is closed")
        retry_after = None
        if response.status in RETRY_AFTER_STATUSES:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return Outcome(RESPONSE, response.status, AiohttpResponse(response), retry_after)

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None
