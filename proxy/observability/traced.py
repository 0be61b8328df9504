"""`traced(handler)`: the SERVER side of tracing, as a wrapper the app puts on its handlers.

A plain function around a handler, not an aiohttp middleware: a handler served by
aiohttp's low-level server (no router, no middlewares) is wrapped the same way,
and a request pays for one coroutine of ours instead of aiohttp's middleware
machinery (a cached chain lookup, a `partial`, and its `current_app` middleware
that it adds as soon as there is any middleware at all).

What a request costs is decided when the handler is wrapped, from the process's
tracing, and then once per request from its `traceparent` alone:

- tracing off: the handler is returned as it is; a request runs nothing of ours;
- propagation only (a sampler that never samples): a handler that makes no
  upstream calls of its own (a proxied route forwards the request's headers, the
  caller's `traceparent` with them) is returned as it is; one that does (the
  checkout) runs with the caller's trace headers in `PASSED`, no span;
- spans may be recorded: a request the sampler is known to drop from its
  `traceparent` alone (a parent-based sampler and an unsampled parent, or no
  parent and a root sampler that never samples) runs with its trace headers in
  `PASSED` and touches nothing of the SDK (no context extracted, no span, no
  context attached); its upstream calls carry the caller's `traceparent` and
  `tracestate` unchanged, as W3C allows a hop that records nothing. Any other
  request gets a SERVER span continuing the caller's trace, as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from proxy.observability import tracing as _tracing
from proxy.observability.tracing import PASSED

R = TypeVar("R", bound=web.BaseRequest)


def traced(
    handler: Callable[[R], Awaitable[web.StreamResponse]],
    *,
    own_calls: bool = True,
    route: str | None = None,
) -> Callable[[R], Awaitable[web.StreamResponse]]:
    """`handler` with the SERVER-span logic of the process's tracing (read now, once).

    `own_calls`: the handler builds upstream calls of its own, which must be handed
    the caller's trace; False for a proxied route (it forwards the request's own
    headers) and for a handler that calls nothing: then propagation only costs it
    nothing per request. `route`: the span's route template; by default the one
    aiohttp's router matched (a request without a `match_info`, from the low-level
    server, then names its path).
    """
    tracing = _tracing.TRACING
    if not tracing.active:
        return handler
    if not tracing.enabled:
        if not own_calls:
            return handler
        return _passing(handler, tracing)
    return _spanning(handler, tracing, route, own_calls)


def _passing(
    handler: Callable[[R], Awaitable[web.StreamResponse]], tracing: _tracing.Tracing
) -> Callable[[R], Awaitable[web.StreamResponse]]:
    """Propagation only: the handler's own upstream calls carry the caller's trace."""
    incoming = tracing.incoming

    async def passing(request: R) -> web.StreamResponse:
        token = PASSED.set(incoming(request.headers))
        try:
            return await handler(request)
        finally:
            PASSED.reset(token)

    return passing


def _spanning(
    handler: Callable[[R], Awaitable[web.StreamResponse]],
    tracing: _tracing.Tracing,
    route: str | None,
    own_calls: bool,
) -> Callable[[R], Awaitable[web.StreamResponse]]:
    door = tracing.door
    incoming = tracing.incoming

    async def spanning(request: R) -> web.StreamResponse:
        headers = request.headers
        if door is not None and door.drops(headers.get("traceparent")):
            # the hot path of a sampled-out request: set and reset by hand, no generator;
            # a proxied request's headers go upstream as they are: PASSED is them, uncopied
            token = PASSED.set(incoming(headers) if own_calls else headers)
            try:
                return await handler(request)
            finally:
                PASSED.reset(token)
        return await _server_span(handler, tracing, route, request)

    return spanning


async def _server_span(
    handler: Callable[[R], Awaitable[web.StreamResponse]],
    tracing: _tracing.Tracing,
    route: str | None,
    request: R,
) -> web.StreamResponse:
    """A SERVER span for the request, continuing the caller's W3C trace."""
    match_info: Any = getattr(request, "match_info", None)
    if route is None:
        resource = match_info.route.resource if match_info is not None else None
        route = resource.canonical if resource is not None else request.path
    with tracing.server_span(request.method, route, request.headers) as span:
        upstream = match_info.get("upstream") if match_info is not None else None
        if upstream:
            span.set_attribute("sidecar.upstream", upstream)
        response = await handler(request)
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            tracing.fail(span, f"HTTP {response.status}")
        return response
