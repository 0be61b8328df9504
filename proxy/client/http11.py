"""Our own HTTP/1.1 upstream client: asyncio protocols, llhttp (httptools) for parsing.

Why not aiohttp's client: a proxied request spent most of its CPU there (a request
object, a writer, a payload, a stream reader, a timer context, a task for the body),
and the shortcut that skipped part of it read aiohttp's private attributes. Here a
request is one bytes join written to a pooled transport, its answer is parsed by
llhttp callbacks into plain lists, and the waiting `send` is woken by resolving one
future: no per-request task and no per-request timer (the caller bounds the time by
cancelling; only opening a connection has a timeout of its own, `connect_timeout`).

Layering follows httpcore's: `Http11Client` (the `HttpClient`: classifies outcomes)
-> `_Pool` (keep-alive connections of one upstream: limit, FIFO waiters, idle
expiry) -> `_Connection` (one socket's protocol: writes a request, parses its
answer) -> `_Response` (the `UpstreamResponse` handed out, whose body may still be
arriving). Nothing here is public but `Http11Client`, `classify_error` and the
exceptions the classification reads.

Rules that keep the pipeline's view honest:
- a request is sent once; a pooled connection found dead after the request was
  written is a RESET ("server closed the connection without a response"), never
  resent behind the pipeline's back, which counts attempts;
- a cancelled `send` or body read closes its connection (a hedge's loser, a
  per-try timeout), so a half-read answer is never handed to the next request;
- a connection is reused only when its answer was read to the end and the upstream
  allows it (llhttp's keep-alive verdict: HTTP/1.0, `Connection: close`, a body that
  ends at EOF); HEAD answers end at their head (llhttp cannot be told to skip a body).

TLS: an upstream's `ClientTls` gives the context and server name of `https://`
connections; a new connection takes the context in force (rotation), and idle
connections made with an older one are closed instead of reused.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.client.protocol import BrokenBody, OutgoingRequest
from proxy.resilience.outcome import RESPONSE, Kind, Outcome
from proxy.resilience.retry import parse_retry_after
from proxy.resilience.rules import RETRY_AFTER_STATUSES
from proxy.tls import ClientTls

SMALL_BODY = 64 * 1024
"""Bodies up to this size are read inside the attempt: one write instead of a chunk loop."""

HIGH_WATER = 256 * 1024
"""Unread response bytes above which the socket stops being read (flow control)."""

MAX_HEAD = 1024 * 1024
"""A response head (status line and headers) larger than this is refused as invalid."""

_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
"""Methods sent without `Content-Length: 0` when they carry no body (as aiohttp did)."""


class ConnectError(OSError):
    """Opening a connection failed; `os_error` says how (refused, TLS, timeout)."""

    def __init__(self, os_error: BaseException) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error


class ServerDisconnected(ConnectionError):
    """The upstream closed the connection before the answer's head arrived."""


class BodyBrokenOff(ConnectionError):
    """The upstream closed or reset the connection in the middle of a body."""


class BadResponse(Exception):
    """The upstream's answer is not valid HTTP/1.1 (llhttp said why)."""


def classify_error(exc: BaseException, *, tls: bool = False) -> Outcome:
    """Map a client error to the outcome kind that retry and breaker reason about.

    `tls` says the request was to an `https://` URL: a connection reset while
    connecting then happened in the TLS handshake (a TCP connect is refused, not
    reset), typically a server that drops a client without the certificate it
    requires instead of sending an alert.
    """
    if isinstance(exc, ConnectError):
        cause = exc.os_error
        if isinstance(cause, ssl.SSLCertVerificationError):
            return Outcome(Kind.TLS_VERIFY_FAILED, detail=_verify_detail(cause))
        if isinstance(cause, ssl.SSLError):
            # while connecting, so the request was never sent. A bare ssl.SSLError later
            # (a broken record mid-body) is a reset: the upstream may have acted.
            reason = getattr(cause, "reason", None)
            return Outcome(
                Kind.TLS_HANDSHAKE_FAILED,
                detail=str(reason) if reason else str(cause) or type(cause).__name__,
            )
        if isinstance(cause, TimeoutError):
            return Outcome(Kind.CONNECT_FAILURE, detail="connect timeout")
        if tls and isinstance(cause, ConnectionResetError | ConnectionAbortedError):
            return Outcome(
                Kind.TLS_HANDSHAKE_FAILED,
                detail="the upstream closed the connection during the TLS handshake",
            )
        strerror = cause.strerror if isinstance(cause, OSError) else None
        return Outcome(Kind.CONNECT_FAILURE, detail=str(strerror or cause))
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Outcome(Kind.TLS_VERIFY_FAILED, detail=_verify_detail(exc))
    if isinstance(exc, ServerDisconnected):
        return Outcome(Kind.RESET, detail="server closed the connection without a response")
    if isinstance(exc, BodyBrokenOff):
        return Outcome(Kind.RESET, detail="response body broken off")
    if isinstance(exc, BadResponse):
        return Outcome(Kind.RESET, detail=f"invalid response: {exc}")
    if isinstance(exc, OSError) and exc.errno in (
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
    ):
        return Outcome(Kind.CONNECT_FAILURE, detail=exc.strerror or str(exc))
    if isinstance(exc, ConnectionError):
        return Outcome(Kind.RESET, detail=exc.strerror or str(exc) or type(exc).__name__)
    return Outcome(Kind.RESET, detail=f"{type(exc).__name__}: {exc}")


def _verify_detail(exc: ssl.SSLCertVerificationError) -> str:
    message = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
    return f"certificate verify failed: {message or exc}"


class _StopAfterHead(Exception):
    """Raised in a HEAD answer's headers callback: llhttp would wait for a body."""


class _Origin:
    """Where one scheme://authority connects, worked out once per client."""

    __slots__ = ("host", "host_line", "idle", "port", "tls")

    def __init__(self, url: URL) -> None:
        host = url.raw_host
        port = url.port
        if not host or port is None or url.raw_user is not None:
            raise ValueError(f"cannot send to {url.scheme}://{url.raw_authority}")
        self.host = host
        self.port = port
        self.tls = url.scheme == "https"
        self.host_line = f"Host: {url.host_port_subcomponent or host}\r\n"
        self.idle: deque[_Connection] = deque()


class _Connection(asyncio.Protocol):
    """One upstream socket: writes a request, parses its answer with llhttp callbacks.

    The connection is the parser's callback object, so the per-request state lives
    in its slots (lists cleared, not rebuilt); the one per-request object is the
    `_Response` handed out. `_waiter` is the one future the reader waits on: the
    head (or whole small body) in `send`, more body while streaming.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_complete",
        "_drain",
        "_error",
        "_fresh_parser",
        "_head_bytes",
        "_head_only",
        "_headers_done",
        "_interim",
        "_keep",
        "_loop",
        "_parser",
        "_raw",
        "_read_paused",
        "_reason",
        "_response",
        "_until_close",
        "_waiter",
        "_whole",
        "_write_paused",
        "closed",
        "context",
        "idle_since",
        "lost",
        "origin",
        "pool",
        "transport",
    )

    def __init__(self, pool: _Pool, origin: _Origin, context: ssl.SSLContext | None) -> None:
        self.pool = pool
        self.origin = origin
        self.context = context
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self.idle_since = 0.0
        self._response: _Response | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._raw: list[bytes] = []
        self._reason = b""
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._head_bytes = 0
        self._complete = False
        self._headers_done = False
        self._interim = False
        self._keep = False
        self._whole = False
        self._head_only = False
        self._until_close = False
        self._fresh_parser = False
        self._error: BaseException | None = None

    # --- asyncio protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a TCP (or TLS) transport; uvloop's do not subclass asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)
        self.pool.connections.add(self)  # from now on its slot is freed by `dropped`

    def data_received(self, data: bytes) -> None:
        if self._response is None or self._complete:
            # bytes nobody asked for (we never pipeline): this connection is not reusable
            self._keep = False
            if self._response is None:
                self.close()
            return
        if not self._headers_done:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._fail(BadResponse(f"response head over {MAX_HEAD} bytes"))
                self.close()
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _StopAfterHead):
                return  # a HEAD answer's head: `finish` gives the next request a new parser
            cause = exc.__context__
            self._fail(cause if isinstance(cause, BadResponse) else BadResponse(str(exc)))
            self.close()
        except httptools.HttpParserUpgrade:
            self._fail(BadResponse("101 Switching Protocols is not supported"))
            self.close()
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(str(exc) or type(exc).__name__))
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport: a half-closed upstream sends nothing more

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.pool.dropped(self)
        if not self._complete and self._response is not None and self._error is None:
            if self._headers_done:
                if self._until_close and exc is None:
                    self._complete_message(False)  # the body ends at EOF
                else:
                    self._fail(BodyBrokenOff())
            else:
                self._fail(ServerDisconnected() if exc is None else exc)
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    # --- llhttp callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            self._keep = False  # a second answer to one request: nothing to reuse

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        raw = self._raw
        raw.append(name)
        raw.append(value)

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        raw = self._raw
        if status < 200:
            if status == 101:
                raise BadResponse("101 Switching Protocols is not supported")
            # interim (100 Continue, 103 Early Hints): the final answer follows
            raw.clear()
            self._reason = b""
            self._interim = True
            return
        response = self._response
        assert response is not None
        if raw:
            # one decode for the whole block: NUL cannot occur in a valid header
            text = b"\0".join(raw).decode("utf-8", "surrogateescape").split("\0")
            raw.clear()
            if len(text) & 1:
                raise BadResponse("NUL in a header")
            pairs = iter(text)
            # a list of pairs: multidict's fast path (a zip is read item by item)
            headers: CIMultiDict[str] = CIMultiDict(list(zip(pairs, pairs, strict=True)))
        else:
            headers = CIMultiDict()
        response.status = status
        response.reason = self._reason.decode("utf-8", "surrogateescape")
        response.headers = CIMultiDictProxy(headers)
        self._headers_done = True
        length = headers.get("Content-Length")
        if length is not None:
            try:
                response.content_length = int(length)
            except ValueError:
                raise BadResponse(f"bad Content-Length {length!r}") from None
        if self._head_only:
            # llhttp has no "skip the body" for HEAD (httptools returns 0 for it), so the
            # message ends here and the connection gets a fresh parser for the next one
            self._fresh_parser = True
            self._whole = True
            self._complete_message(parser.should_keep_alive())
            raise _StopAfterHead
        if status == 204 or status == 304:
            self._whole = True  # llhttp ends the message now
        elif length is not None:
            self._whole = response.content_length is not None and (
                response.content_length <= SMALL_BODY
            )
        else:
            te = headers.get("Transfer-Encoding")
            self._until_close = te is None or "chunked" not in te.lower()
        if not self._whole:
            self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        if not self._whole:
            self._buffered += len(body)
            if self._buffered > HIGH_WATER and not self._read_paused:
                self._read_paused = True
                assert self.transport is not None
                self.transport.pause_reading()
            self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete_message(self._parser.should_keep_alive())

    # --- the request ----------------------------------------------------------------

    def _complete_message(self, keep: bool) -> None:
        self._complete = True
        self._keep = keep
        if self._whole:
            response = self._response
            assert response is not None
            chunks = self._chunks
            response.body = b"".join(chunks)
            chunks.clear()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(exc)

    def begin(
        self, response: _Response, head: bytes, body: bytes | None, head_only: bool
    ) -> asyncio.Future[None]:
        """Write a request's head (and its bytes body); the future its answer resolves.

        Not a coroutine: `send` awaits the future itself, one frame less per request.
        """
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise ServerDisconnected()
        self._response = response
        self._head_only = head_only
        self._waiter = waiter = self._loop.create_future()
        if body is None:
            transport.write(head)
        elif len(body) <= SMALL_BODY:
            transport.write(head + body)  # one send: a copy is cheaper than a syscall
        else:
            transport.writelines((head, body))
        return waiter

    def abandon(self) -> None:
        """The request failed or was cancelled before its answer: close, unawaited."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.cancel()  # nobody will await it: no "exception never retrieved"
        self.close()

    async def stream_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        """Send a streamed body (after `begin` sent the head), pausing when the socket is."""
        transport = self.transport
        assert transport is not None
        async for chunk in body:
            if self.closed or self._complete:
                # the answer came (or the connection went) first: stop sending, and the
                # upstream, still expecting the rest, can never take another request here
                self._keep = False
                break
            if not chunk:
                continue
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            if self._write_paused and not self.closed:
                self._drain = self._loop.create_future()
                await self._drain
                self._drain = None
        else:
            if chunked and not self.closed:
                transport.write(b"0\r\n\r\n")

    async def more(self) -> None:
        """Wait until more body, its end or an error is there (only when none is)."""
        self._waiter = waiter = self._loop.create_future()
        await waiter

    def take(self) -> bytes:
        """The body bytes buffered so far; reading resumes if it was paused."""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._read_paused and not self.closed:
            self._read_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return data

    def finish(self, response: _Response) -> None:
        """The holder lets `response` go: back to the pool if read whole, else closed."""
        if self._response is not response:
            return
        if self._complete and self._keep and not self.closed:
            self._response = None
            self._complete = self._headers_done = self._whole = False
            self._until_close = self._interim = False
            self._reason = b""
            self._head_bytes = 0
            self._buffered = 0
            self._error = None
            self._chunks.clear()
            if self._read_paused:  # paused by a last burst nobody read: the next answer needs it
                self._read_paused = False
                assert self.transport is not None
                self.transport.resume_reading()
            if self._fresh_parser:
                self._fresh_parser = False
                self._parser = httptools.HttpResponseParser(self)
            self.pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        """Close at once (abort: nothing of ours is worth flushing) and free the slot.

        A reader still waiting on this connection (the pool closed under it) is told
        its answer broke off; the EOF that follows is not taken as a body's end.
        """
        if not self.closed:
            self.closed = True
            self.pool.dropped(self)
        if not self._complete and self._response is not None:
            self._fail(BodyBrokenOff() if self._headers_done else ServerDisconnected())
        if self.transport is not None:
            self.transport.abort()


class _Response:
    """An upstream answer as an `UpstreamResponse`; its body may still be arriving."""

    __slots__ = ("_conn", "body", "content_length", "headers", "reason", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self.status = 0
        self.reason: str | None = None
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self.content_length: int | None = None
        self.body: bytes | None = None

    async def read(self) -> bytes:
        if self.body is not None:
            return self.body
        parts = [data async for data in self._pieces()]
        self.body = b"".join(parts)
        return self.body

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        if self.body is not None:
            for start in range(0, len(self.body), size):
                yield self.body[start : start + size]
            return
        async for data in self._pieces():
            if len(data) <= size:
                yield data
            else:
                for start in range(0, len(data), size):
                    yield data[start : start + size]

    async def _pieces(self) -> AsyncIterator[bytes]:
        """The body as it arrives; a broken one raises BrokenBody."""
        conn = self._conn
        if conn is None:
            raise BrokenBody(Outcome(Kind.RESET, detail="the response was let go"))
        while True:
            if conn._response is not self:  # let go meanwhile: the connection is not ours
                raise BrokenBody(Outcome(Kind.RESET, detail="the response was let go"))
            if conn._chunks:
                yield conn.take()
            elif conn._complete:
                return
            elif conn._error is not None:
                raise BrokenBody(classify_error(conn._error))
            else:
                try:
                    await conn.more()
                except asyncio.CancelledError:
                    conn.close()  # half read: never handed to another request
                    raise
                except Exception as exc:
                    raise BrokenBody(classify_error(exc)) from exc

    def let_go(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.finish(self)


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class _Pool:
    """One upstream's keep-alive connections: at most `max_connections`, FIFO waiters.

    A waiter is handed a released connection or a freed slot directly, so a request
    arriving later cannot overtake it. Idle connections are reused most recent
    first and closed after `keepalive` seconds unused; one the upstream closes
    leaves the pool when the loop sees it (`connection_lost`).
    """

    def __init__(
        self,
        max_connections: int,
        keepalive: float,
        connect_timeout: float,
        server_name: str | None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.server_name = server_name  # the TLS server name to ask for (None: the URL's host)
        self.max_connections = max_connections
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.count = 0  # open or opening connections: the slots taken
        self.connections: set[_Connection] = set()
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self.origins: dict[tuple[str, str], _Origin] = {}
        self.closed = False
        self._sweep: asyncio.TimerHandle | None = None

    async def connection(self, origin: _Origin, context: ssl.SSLContext | None) -> _Connection:
        """A pooled connection to `origin` made with `context`, else a new one."""
        idle = origin.idle
        while True:
            while idle:
                conn = idle.pop()
                if conn.context is context:
                    return conn
                conn.close()  # made with a rotated-out TLS context: not for new requests
            if self.closed:
                raise ConnectError(ConnectionRefusedError("the upstream's pool is closed"))
            if self.count < self.max_connections or self._close_stale():
                self.count += 1
                return await self._open(origin, context)
            waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
            self.waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._pass_on(waiter.result())
                raise
            if handed is None:
                return await self._open(origin, context)  # a slot handed over
            if handed.closed:
                continue  # lost on its way to us (its slot went with it): try again
            if handed.origin is origin and handed.context is context:
                return handed
            handed.close()  # frees its slot (to the next waiter, or to us on the next turn)

    def _close_stale(self) -> bool:
        """Make room by closing an idle connection to another origin or TLS context."""
        for origin in self.origins.values():
            if origin.idle:
                origin.idle.popleft().close()
                return self.count < self.max_connections
        return False

    async def _open(self, origin: _Origin, context: ssl.SSLContext | None) -> _Connection:
        """Open a connection in a slot already taken; the slot is freed if it fails."""
        loop = self.loop
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, conn = await loop.create_connection(
                        lambda: _Connection(self, origin, context),
                        origin.host,
                        origin.port,
                        ssl=context,
                        server_hostname=self.server_name if context is not None else None,
                    )
                    assert isinstance(conn, _Connection)
            except TimeoutError as exc:
                raise ConnectError(TimeoutError("connect timeout")) from exc
            except OSError as exc:
                raise ConnectError(exc) from exc
        except BaseException:
            self._free_slot()
            raise
        if self.closed:
            conn.close()
            raise ConnectError(ConnectionRefusedError("the upstream's pool is closed"))
        return conn

    def release(self, conn: _Connection) -> None:
        """A connection whose answer was read whole: to a waiter, else idle."""
        if self.closed:
            conn.close()
            return
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = self.loop.time()
        conn.origin.idle.append(conn)
        if self._sweep is None:
            self._sweep = self.loop.call_at(conn.idle_since + self.keepalive, self._expire)

    def _pass_on(self, handed: _Connection | None) -> None:
        if handed is None:
            self._free_slot()
        else:
            self.release(handed)

    def dropped(self, conn: _Connection) -> None:
        """`conn` closed (by us or the upstream): out of the pool, its slot freed."""
        if conn in self.connections:
            self.connections.discard(conn)
            idle = conn.origin.idle
            if idle and conn in idle:
                idle.remove(conn)
            self._free_slot()

    def _free_slot(self) -> None:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes to the waiter as it is
                return
        self.count -= 1

    def _expire(self) -> None:
        """Close connections idle for `keepalive`; come back for the next one due."""
        self._sweep = None
        deadline = self.loop.time() - self.keepalive
        due: float | None = None
        for origin in self.origins.values():
            idle = origin.idle
            while idle and idle[0].idle_since <= deadline:
                idle[0].close()  # dropped() takes it out of `idle`
            if idle:
                oldest = idle[0].idle_since
                due = oldest if due is None else min(due, oldest)
        if due is not None and not self.closed:
            self._sweep = self.loop.call_at(due + self.keepalive, self._expire)

    def close(self) -> None:
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self.connections):
            conn.close()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(
                    ConnectError(ConnectionRefusedError("the upstream's pool is closed"))
                )


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
        self._pool: _Pool | None = None
        self._closed = False

    def _new_pool(self) -> _Pool:
        pool = _Pool(
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
                origin = pool.origins[key] = _Origin(url)
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
            if method not in _NO_BODY_METHODS and "Content-Length" not in headers:
                extra = "Content-Length: 0\r\n"
        elif isinstance(body, bytes):
            if "Content-Length" not in headers:
                extra = f"Content-Length: {len(body)}\r\n"
        elif "Content-Length" not in headers:
            chunked = True
            extra = "Transfer-Encoding: chunked\r\n"
        host = "" if "Host" in headers else origin.host_line
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
        response = _Response(conn)
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
