"""HTTP forwarding: what crosses the proxy, in which form, and what does not.

Hop-by-hop headers belong to one connection and are dropped (RFC 9110 7.6.1),
`X-Forwarded-*` say who the original caller was, bodies are streamed both ways so
a large body never sits in memory, and compressed bodies pass through untouched.
A small request body is buffered instead so it can be sent again on a retry.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy, istr

from proxy.client import BrokenBody, UpstreamResponse

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# set by the client library for the upstream connection, or by us
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "x-request-timeout-ms"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
# As `istr`: a case-insensitive lookup with a plain `str` lowercases and hashes the name
# anew on every test, an `istr` carries both (about a third of the cost, ~25 tests a request)
_REQUEST_DROP_NAMES = tuple(istr(name) for name in sorted(_REQUEST_DROP))
_RESPONSE_DROP_NAMES = tuple(istr(name) for name in sorted(_RESPONSE_DROP))

CHUNK = 64 * 1024


class PayloadTooLarge(Exception):
    """The request body is over the route's `max_request_body`."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body is larger than {limit} bytes")
        self.limit = limit


class IncompleteBody(Exception):
    """The client closed or broke off before sending the body it announced."""


_TOKENS_SEEN: dict[str, tuple[str, ...]] = {}
"""Connection header values already split: nearly every answer says `keep-alive`."""


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    tokens: set[str] = set()
    for value in headers.getall(hdrs.CONNECTION, ()):
        split = _TOKENS_SEEN.get(value)
        if split is None:
            split = tuple(t.strip().lower() for t in value.split(",") if t.strip())
            if len(_TOKENS_SEEN) < 64:  # bounded: a client could send endless variants
                _TOKENS_SEEN[value] = split
        tokens.update(split)
    return tokens


def _without(incoming: CIMultiDictProxy[str], drop: tuple[istr, ...]) -> CIMultiDict[str]:
    """A copy of `incoming` minus the `drop` headers and those its Connection header names.

    One C-level copy, then a few deletions: cheaper than adding the kept headers one
    by one, and the kept ones stay in their order with their spelling.
    """
    out = incoming.copy()
    for name in drop:
        if name in out:
            del out[name]
    if hdrs.CONNECTION in incoming:
        for token in _connection_tokens(incoming):
            out.popall(token, None)
    return out


def upstream_request_headers(request: web.BaseRequest) -> CIMultiDict[str]:
    """The client's headers as the upstream should see them, X-Forwarded-* added."""
    incoming = request.headers
    out = _without(incoming, _REQUEST_DROP_NAMES)
    peer = request.remote or ""
    prior = incoming.get(hdrs.X_FORWARDED_FOR)
    out[hdrs.X_FORWARDED_FOR] = f"{prior}, {peer}" if prior else peer
    if hdrs.X_FORWARDED_PROTO not in out:
        out[hdrs.X_FORWARDED_PROTO] = request.scheme
    if hdrs.X_FORWARDED_HOST not in out and request.host:
        out[hdrs.X_FORWARDED_HOST] = request.host
    return out


def client_response_headers(upstream: UpstreamResponse) -> CIMultiDict[str]:
    """The upstream's response headers minus those that belong to its connection."""
    return _without(upstream.headers, _RESPONSE_DROP_NAMES)


@dataclass(slots=True)
class RequestBody:
    """What will be sent upstream: bytes (replayable) or a one-shot stream."""

    data: bytes | AsyncIterator[bytes] | None
    replayable: bool
    length: int | None  # the announced Content-Length when streaming
    too_large: PayloadTooLarge | None = None  # set by the stream when it overran the limit


NO_BODY = RequestBody(None, True, None)
"""The body of a request without one (most): shared, never changed (only a streamed
body's own `RequestBody` is ever written to, by its stream)."""


async def read_request_body(
    request: web.BaseRequest, buffer_limit: int, max_body: int
) -> RequestBody:
    """Buffer a body up to `buffer_limit` so it can be retried; stream a larger one.

    A body over `max_body` raises PayloadTooLarge: at once when its Content-Length
    says so, or while streaming when a chunked body grows past it.
    """
    if not request.body_exists:
        return NO_BODY
    length = request.content_length
    if length is not None and length > max_body:
        raise PayloadTooLarge(max_body)
    content = request.content
    if length is not None and length <= buffer_limit:
        try:
            return RequestBody(await content.readexactly(length), True, length)
        except asyncio.IncompleteReadError:
            raise IncompleteBody(f"body ended after fewer than {length} bytes") from None

    # unknown or large length: read a prefix; if the body ends inside it, buffer it
    prefix: list[bytes] = []
    size = 0
    while size <= buffer_limit:
        chunk = await content.readany()
        if not chunk:
            if length is not None and size < length:
                raise IncompleteBody(f"body ended after {size} of {length} bytes")
            return RequestBody(b"".join(prefix), True, size)
        size += len(chunk)
        if size > max_body:
            raise PayloadTooLarge(max_body)
        prefix.append(chunk)

    body = RequestBody(None, False, length)
    body.data = _stream_rest(request, prefix, size, max_body, body)
    return body


async def _stream_rest(
    request: web.BaseRequest, prefix: list[bytes], size: int, max_body: int, body: RequestBody
) -> AsyncIterator[bytes]:
    for chunk in prefix:
        yield chunk
    prefix.clear()
    content = request.content
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        size += len(chunk)
        if size > max_body:
            body.too_large = PayloadTooLarge(max_body)
            raise body.too_large
        yield chunk


ATTEMPTS_HEADER = istr("X-Sidecar-Attempts")
"""On every proxied answer: how many attempts the sidecar made for it."""


def whole_upstream_response(
    request: web.BaseRequest, upstream: UpstreamResponse, attempts: int
) -> web.Response | None:
    """The upstream's answer as one response when its body was read whole inside the
    attempt (the usual small answer): built without a coroutine, nothing to wait for.
    None when it must go through `send_upstream_response` (streamed, HEAD, 204, 304)."""
    body = upstream.body
    if body is None or upstream.status in (204, 304) or request.method == "HEAD":
        return None
    headers = client_response_headers(upstream)
    headers[ATTEMPTS_HEADER] = str(attempts)
    return web.Response(status=upstream.status, reason=upstream.reason, headers=headers, body=body)


async def send_upstream_response(
    request: web.BaseRequest,
    upstream: UpstreamResponse,
    attempts: int,
    remaining: float,
) -> web.StreamResponse:
    """Pass the upstream's answer to the client: whole when small, streamed when not.

    The stream is bounded by the call's deadline; if it runs out or the upstream
    breaks off mid-body, the client connection is aborted so a truncated body can
    never look complete.
    """
    whole = whole_upstream_response(request, upstream, attempts)
    if whole is not None:
        return whole
    headers = client_response_headers(upstream)
    headers[ATTEMPTS_HEADER] = str(attempts)
    if upstream.status in (204, 304) or request.method == "HEAD":
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=headers
        )
        if upstream.content_length is not None and upstream.status not in (204, 304):
            response.content_length = upstream.content_length
        upstream.let_go()
        await response.prepare(request)
        await response.write_eof()
        return response

    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    await response.prepare(request)
    try:
        async with asyncio.timeout(remaining):
            async for chunk in upstream.chunks(CHUNK):
                await response.write(chunk)
    except (TimeoutError, BrokenBody, ConnectionError):
        upstream.let_go()  # unread rest: the connection is closed, not pooled
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError from None
    await response.write_eof()
    return response
