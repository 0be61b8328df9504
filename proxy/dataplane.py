"""The data plane's one handler: which route a request is for, decided without a router.

The listener runs on aiohttp's low-level server (`web.Server`): each request comes
straight here as a `BaseRequest`, with no URL dispatcher resolving resources and no
middleware chain around it. There are only three routes, so a few string tests on
the raw path do the router's work at a fraction of its cost, which matters on the
proxied route: its whole budget is a few tens of microseconds.

- `POST <checkout.path>` and `GET <checkout.path>/<id>`: the composite checkout,
  when one is configured (read from the runtime in force, so a reload that adds or
  moves it takes effect at once); another method there is a 405 naming the one
  allowed.
- `/<upstream>/<rest>` and `/<upstream>`: proxied to that upstream.

Tests and the demo mount the same handler in a `web.Application` (`Sidecar.build_app`)
to get aiohttp's test fixtures and start-up hooks; the routing is this module's either
way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import unquote

from aiohttp import web

from proxy.errors import json_error
from proxy.runtime import RuntimeSource

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
ByNameHandler = Callable[[web.BaseRequest, str], Awaitable[web.StreamResponse]]
"""A route that takes a name from the path: the proxied route's upstream, a checkout id."""

PROXY_ROUTE = "/{upstream}/{tail}"
"""The proxied route's name in traces (a route template, never a raw path)."""


def upstream_name(raw_path: str) -> str:
    """The first segment of a raw request path: `/bench/json?x` -> `bench`."""
    return raw_path.partition("?")[0].split("/", 2)[1]


def checkout_target(raw_path: str, path: str) -> str | None:
    """Which checkout `raw_path` names: `""` the checkout route itself, an id one
    checkout's, None neither (`/checkouts/x` is an upstream's, not the checkout's)."""
    if not raw_path.startswith(path):
        return None
    rest = raw_path[len(path) :].partition("?")[0]
    if not rest:
        return ""
    if rest[0] == "/" and len(rest) > 1 and "/" not in rest[1:]:
        return unquote(rest[1:])
    return None


class DataPlane:
    """Dispatches every request of the data-plane listener to its route."""

    __slots__ = ("checkout_get", "checkout_post", "proxy", "source")

    def __init__(
        self,
        source: RuntimeSource,
        proxy: ByNameHandler,
        checkout_post: Handler,
        checkout_get: ByNameHandler,
    ) -> None:
        self.source = source
        self.proxy = proxy
        self.checkout_post = checkout_post
        self.checkout_get = checkout_get

    def __call__(self, request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        """The route's coroutine, returned rather than awaited here: one frame less
        for every resumption of a proxied request (its whole chain is walked each time)."""
        raw_path = request.raw_path
        plan = self.source.runtime.plan
        if plan is not None:
            target = checkout_target(raw_path, plan.path)
            if target == "":
                if request.method == "POST":
                    return self.checkout_post(request)
                return _answer(_not_allowed(request.method, "POST"))
            if target is not None:
                if request.method in ("GET", "HEAD"):
                    return self.checkout_get(request, target)
                return _answer(_not_allowed(request.method, "GET"))
        return self.proxy(request, upstream_name(raw_path))

    def routes(self) -> list[tuple[str, str]]:
        """(method, route template) of everything this handler serves; `*` is any method."""
        served = [("*", PROXY_ROUTE)]
        plan = self.source.runtime.plan
        if plan is not None:
            served += [("POST", plan.path), ("GET", plan.path + "/{id}")]
        return served


async def _answer(response: web.StreamResponse) -> web.StreamResponse:
    return response


def _not_allowed(method: str, allowed: str) -> web.Response:
    return json_error(
        405,
        f"{method} is not allowed here: use {allowed}",
        "method_not_allowed",
        headers={"Allow": allowed},
        allowed=allowed,
    )
