"""Our own HTTP/1.1 upstream client: asyncio protocols, llhttp (httptools) for parsing.

Why not aiohttp's client: a proxied request spent most of its CPU there (a request
object, a writer, a payload, a stream reader, a timer context, a task for the body),
and the shortcut that skipped part of it read aiohttp's private attributes. Here a
request is one bytes join written to a pooled transport, its answer is parsed by
llhttp callbacks into plain lists, and the waiting `send` is woken by resolving one
future: no per-request task and no per-request timer (the caller bounds the time by
cancelling; only opening a connection has a timeout of its own, `connect_timeout`).

Layering follows httpcore's, a module each: `client.Http11Client` (the `HttpClient`:
builds the request head, classifies outcomes) -> `pool.Pool` (keep-alive connections
of one upstream: limit, FIFO waiters, idle expiry) -> `connection.Connection` (one
socket's protocol: writes a request, parses its answer) -> `connection.Response` (the
`UpstreamResponse` handed out, whose body may still be arriving); `errors` classifies.
Nothing here is public but what this package exports.

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

from proxy.client.http11.client import Http11Client
from proxy.client.http11.connection import SMALL_BODY
from proxy.client.http11.errors import (
    BadResponse,
    BodyBrokenOff,
    ConnectError,
    ServerDisconnected,
    classify_error,
)

__all__ = [
    "SMALL_BODY",
    "BadResponse",
    "BodyBrokenOff",
    "ConnectError",
    "Http11Client",
    "ServerDisconnected",
    "classify_error",
]
