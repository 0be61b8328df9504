"""`Http11Client`: the `HttpClient` every upstream uses; requests in, outcomes out."""

from __future__ import annotations

import asyncio
import ssl

from multidict import CIMultiDict, istr

from proxy.client.http11.connection import Origin, Response
from proxy.client.http11.errors import BadResponse, ConnectError, classify_error
from proxy.client.http11.pool import Pool
from proxy.client.protocol import OutgoingRequest
from proxy.resilience.outcome import RESPONSE, Kind, Outcome
from proxy.resilience.retry import parse_retry_after
from proxy.resilience.rules import RETRY_AFTER_STATUSES
from proxy.tls import ClientTls

_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
"""Methods sent without `Content-Length: 0` when they carry no body (as aiohttp did)."""

_HOST = istr("Host")
_CONTENT_LENGTH = istr("Content-Length")
"""Header names looked up on every request: an `istr` carries its lowercased form and
hash, which a plain `str` would have computed anew for each lookup."""


_default_context: ssl.SSLContext | None = None


def _system_context() -> ssl.SSLContext:
    """Verified against the system store: `https://` upstreams without a `tls:` section."""
    global _default_context
    if _default_context is None:
        _default_context = ssl.create_default_context()
    return _default_context


def _fields(headers: CIMultiDict[str]) -> str:
    """The header lines, each ending in CRLF; a CR or LF inside a name or value is refused.

    One C-level join, and two counts instead of a check per header: any CR or LF of
    the caller's makes a count differ from the separators'.
    """
    last = len(headers) - 1
    if last < 0:
        return ""
    block = "\r\n".join(map(": ".join, headers.items()))
    if block.count("\n") != last or block.count("\r") != last:
        raise ValueError("a header name or value holds a line break")
    return block + "\r\n"


class Http11Client:
    """An `HttpClient` on our own HTTP/1.1 connections, pooled per upstream.

    `tls` (an upstream's `tls:` section, loaded) gives the context and server name
    of `https://` requests; without it they are verified against the system store.
    The pool is made on first use (it needs the running loop).
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
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._keepalive = keepalive
        self._pool: Pool | None = None
        self._closed = False

    def _new_pool(self) -> Pool:
        pool = Pool(
            self._max_connections,
            self._keepalive,
            self._connect_timeout,
            self._tls.server_name if self._tls is not None else None,
        )
        self._pool = pool
        return pool

    async def send(self, request: OutgoingRequest) -> Outcome:
        if self._closed:
            # a retry after close() fails like the first attempt would, never reopens a pool
            return Outcome(Kind.CONNECT_FAILURE, detail="the upstream's pool is closed")
        pool = self._pool or self._new_pool()
        url = request.url
        scheme = url.scheme
        key = (scheme, url.raw_authority)
        origin = pool.origins.get(key)
        if origin is None:
            try:
                origin = pool.origins[key] = Origin(url)
            except ValueError as exc:
                return Outcome(Kind.CONNECT_FAILURE, detail=str(exc))
        context = None
        if origin.tls:
            context = self._tls.context() if self._tls is not None else _system_context()
        method = request.method
        headers = request.headers
        body = request.body
        extra = ""
        chunked = False
        if body is None:
            if method not in _NO_BODY_METHODS and _CONTENT_LENGTH not in headers:
                extra = "Content-Length: 0\r\n"
        elif isinstance(body, bytes):
            if _CONTENT_LENGTH not in headers:
                extra = f"Content-Length: {len(body)}\r\n"
        elif _CONTENT_LENGTH not in headers:
            chunked = True
            extra = "Transfer-Encoding: chunked\r\n"
        host = "" if _HOST in headers else origin.host_line
        try:
            head = (
                f"{method} {url.raw_path_qs} HTTP/1.1\r\n{host}{_fields(headers)}{extra}\r\n"
            ).encode("utf-8", "surrogateescape")
        except ValueError as exc:
            return Outcome(Kind.CONNECT_FAILURE, detail=f"request not sent: {exc}")
        idle = origin.idle
        conn = idle.pop() if idle and idle[-1].context is context else None
        try:
            if conn is None:
                conn = await pool.connection(origin, context)
        except ConnectError as exc:
            return classify_error(exc, tls=origin.tls)
        response = Response(conn)
        try:
            if body is None or isinstance(body, bytes):
                await conn.begin(response, head, body, method == "HEAD")
            else:
                waiter = conn.begin(response, head, None, method == "HEAD")
                await conn.stream_body(body, chunked)
                await waiter
        except (OSError, BadResponse) as exc:
            conn.abandon()
            return classify_error(exc, tls=origin.tls)
        except asyncio.CancelledError:
            conn.abandon()  # a hedge's loser or a per-try timeout: never back to the pool
            raise
        except Exception as exc:  # the caller's body stream broke (or grew over its limit)
            conn.abandon()
            return Outcome(Kind.RESET, detail=f"the request body broke off: {exc}")
        status = response.status
        retry_after = None
        if status in RETRY_AFTER_STATUSES:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return Outcome(RESPONSE, status, response, retry_after)

    @property
    def closed(self) -> bool:
        """Whether `close()` ran: a `send` now fails like an unreachable upstream."""
        return self._closed

    async def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.close()
            self._pool = None
