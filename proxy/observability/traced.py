"""`traced(handler)`: the SERVER side of tracing, as a wrapper the app puts on its handlers.

A plain function around a handler, not an aiohttp middleware: a handler served by
aiohttp's low-level server (no router, no middlewares) is wrapped the same way,
and a request pays for one call of ours (one coroutine when it records a span)
instead of aiohttp's middleware machinery (a cached chain lookup, a `partial`,
and its `current_app` middleware that it adds as soon as there is any middleware
at all). A request that records no span gets the handler's own coroutine back,
with `PASSED` set in the request's task: aiohttp runs each request in a task of
its own, so nothing needs resetting after it.

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
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from aiohttp import web

from proxy.observability import tracing as _tracing
from proxy.observability.tracing import PASSED

R = TypeVar("R", bound=web.BaseRequest)
P = ParamSpec("P")
Handler = Callable[Concatenate[R, P], Awaitable[web.StreamResponse]]
UpstreamOf = Callable[..., str | None]
"""Given the handler's arguments (the request first), the upstream its span names."""


def traced(
    handler: Handler[R, P],
    *,
    route: str,
    own_calls: bool = True,
    upstream_of: UpstreamOf | None = None,
) -> Handler[R, P]:
    """`handler` with the SERVER-span logic of the process's tracing (read now, once).

    `route`: the span's route template (the data plane has no router to ask).
    `own_calls`: the handler builds upstream calls of its own, which must be handed
    the caller's trace; False for a proxied route (it forwards the request's own
    headers) and for a handler that calls nothing: then propagation only costs it
    nothing per request. `upstream_of`: the `sidecar.upstream` attribute of the
    span, from the handler's arguments. Arguments after the request are passed on
    (positionally: the wrapped handler takes no keyword arguments).
    """
    tracing = _tracing.TRACING
    if not tracing.active:
        return handler
    if not tracing.enabled:
        if not own_calls:
            return handler
        return _passing(handler, tracing)
    return _spanning(handler, tracing, route, own_calls, upstream_of)


def _passing(handler: Handler[R, P], tracing: _tracing.Tracing) -> Handler[R, P]:
    """Propagation only: the handler's own upstream calls carry the caller's trace."""
    incoming = tracing.incoming
    call: Callable[..., Awaitable[web.StreamResponse]] = handler  # called positionally

    def passing(request: R, *args: Any) -> Awaitable[web.StreamResponse]:
        # no reset needed: the request's own task ends with it (see `_spanning`)
        PASSED.set(incoming(request.headers))
        return call(request, *args)

    return cast(Handler[R, P], passing)


def _spanning(
    handler: Handler[R, P],
    tracing: _tracing.Tracing,
    route: str,
    own_calls: bool,
    upstream_of: UpstreamOf | None,
) -> Handler[R, P]:
    door = tracing.door
    incoming = tracing.incoming
    call: Callable[..., Awaitable[web.StreamResponse]] = handler  # called positionally

    # positional only (the data plane passes no keywords): packing an empty **kwargs and
    # spreading it again costs about 400 instructions on every request
    def spanning(request: R, *args: Any) -> Awaitable[web.StreamResponse]:
        headers = request.headers
        if door is not None and door.drops(headers.get("traceparent")):
            # The hot path of a sampled-out request: the handler's own coroutine, with no
            # frame of ours around it (with the door's checks in one pattern, an unsampled
            # parent went from +5.0% to +2.9% instructions per proxied request). PASSED
            # needs no reset: aiohttp runs each request in a task of its own, so what is
            # set here is this request's alone and ends with its task (a test holds
            # aiohttp to that). A proxied request's headers go upstream as they are:
            # PASSED is them, uncopied.
            PASSED.set(incoming(headers) if own_calls else headers)
            return call(request, *args)
        return recorded(request, *args)

    async def recorded(request: R, *args: Any) -> web.StreamResponse:
        upstream = upstream_of(request, *args) if upstream_of is not None else None
        with tracing.server_span(request.method, route, request.headers) as span:
            if upstream:
                span.set_attribute("sidecar.upstream", upstream)
            response = await call(request, *args)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                tracing.fail(span, f"HTTP {response.status}")
            return response

    return cast(Handler[R, P], spanning)
