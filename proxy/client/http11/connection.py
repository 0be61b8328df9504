"""One upstream socket: the asyncio protocol that writes a request and parses its answer.

The connection is llhttp's callback object (httptools), so a request's state lives in
its slots; the answer handed out is a `Response`, whose body may still be arriving.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy, istr
from yarl import URL

from proxy.client.http11.errors import (
    BadResponse,
    BodyBrokenOff,
    ServerDisconnected,
    classify_error,
)
from proxy.client.protocol import BrokenBody
from proxy.resilience.outcome import Kind, Outcome

if TYPE_CHECKING:
    from proxy.client.http11.pool import Pool

SMALL_BODY = 64 * 1024
"""Bodies up to this size are read inside the attempt: one write instead of a chunk loop."""

HIGH_WATER = 256 * 1024
"""Unread response bytes above which the socket stops being read (flow control)."""

MAX_HEAD = 1024 * 1024
"""A response head (status line and headers) larger than this is refused as invalid."""

_CONTENT_LENGTH = istr("Content-Length")
_TRANSFER_ENCODING = istr("Transfer-Encoding")
"""As `istr`, which carries its lowercased form and hash: read from every answer."""


class _StopAfterHead(Exception):
    """Raised in a HEAD answer's headers callback: llhttp would wait for a body."""


class Origin:
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
        self.idle: deque[Connection] = deque()


class Connection(asyncio.Protocol):
    """One upstream socket: writes a request, parses its answer with llhttp callbacks.

    The connection is the parser's callback object, so the per-request state lives
    in its slots (lists cleared, not rebuilt); the one per-request object is the
    `Response` handed out. `_waiter` is the one future the reader waits on: the
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

    def __init__(self, pool: Pool, origin: Origin, context: ssl.SSLContext | None) -> None:
        self.pool = pool
        self.origin = origin
        self.context = context
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self.idle_since = 0.0
        self._response: Response | None = None
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
        length = headers.get(_CONTENT_LENGTH)
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
            te = headers.get(_TRANSFER_ENCODING)
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
        self, response: Response, head: bytes, body: bytes | None, head_only: bool
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

    def finish(self, response: Response) -> None:
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


class Response:
    """An upstream answer as an `UpstreamResponse`; its body may still be arriving."""

    __slots__ = ("_conn", "body", "content_length", "headers", "reason", "status")

    def __init__(self, conn: Connection) -> None:
        self._conn: Connection | None = conn
        self.status = 0
        self.reason: str | None = None
        self.headers: CIMultiDictProxy[str] = NO_HEADERS
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


NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
