"""The data plane's routing without a router: which handler a raw path reaches."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.dataplane import PROXY_ROUTE, DataPlane, checkout_target, upstream_name


@pytest.mark.parametrize(
    ("raw_path", "name"),
    [
        ("/bench/json", "bench"),
        ("/bench", "bench"),
        ("/bench?x=1/2", "bench"),
        ("/bench/a?b", "bench"),
        ("/", ""),
        ("/pay%6Dent/x", "pay%6Dent"),  # raw: names are matched as written
    ],
)
def test_upstream_name_is_the_first_raw_segment(raw_path: str, name: str) -> None:
    assert upstream_name(raw_path) == name


@pytest.mark.parametrize(
    ("raw_path", "target"),
    [
        ("/checkout", ""),
        ("/checkout?x=1", ""),
        ("/checkout/chk_1", "chk_1"),
        ("/checkout/chk%201?x", "chk 1"),
        ("/checkout/", None),
        ("/checkout/a/b", None),
        ("/checkouts/a", None),
        ("/payment/checkout", None),
    ],
)
def test_checkout_target(raw_path: str, target: str | None) -> None:
    assert checkout_target(raw_path, "/checkout") == target


class Calls:
    def __init__(self) -> None:
        self.seen: list[tuple[str, ...]] = []

    async def post(self, request: web.BaseRequest) -> web.StreamResponse:
        self.seen.append(("post",))
        return web.Response(text="post")

    async def get(self, request: web.BaseRequest, checkout_id: str) -> web.StreamResponse:
        self.seen.append(("get", checkout_id))
        return web.Response(text="get")

    async def handle(self, request: web.BaseRequest, name: str) -> web.StreamResponse:
        self.seen.append(("proxy", name))
        return web.Response(text="proxy")


def plane(calls: Calls, path: str | None = "/checkout") -> DataPlane:
    plan = None if path is None else SimpleNamespace(path=path)
    source: Any = SimpleNamespace(runtime=SimpleNamespace(plan=plan))
    return DataPlane(source, calls.handle, calls.post, calls.get)


@pytest.mark.parametrize(
    ("method", "raw_path", "seen"),
    [
        ("POST", "/checkout", ("post",)),
        ("GET", "/checkout/chk_1", ("get", "chk_1")),
        ("HEAD", "/checkout/chk_1", ("get", "chk_1")),
        ("GET", "/payment/authorize", ("proxy", "payment")),
        ("POST", "/checkouts/x", ("proxy", "checkouts")),
        ("GET", "/checkout/a/b", ("proxy", "checkout")),
    ],
)
async def test_each_route_reaches_its_handler(
    method: str, raw_path: str, seen: tuple[str, ...]
) -> None:
    calls = Calls()
    response = await plane(calls)(make_mocked_request(method, raw_path))
    assert response.status == 200
    assert calls.seen == [seen]


@pytest.mark.parametrize(
    ("method", "raw_path", "allowed"),
    [("GET", "/checkout", "POST"), ("DELETE", "/checkout/chk_1", "GET")],
)
async def test_another_method_on_the_checkout_is_a_json_405(
    method: str, raw_path: str, allowed: str
) -> None:
    calls = Calls()
    response = await plane(calls)(make_mocked_request(method, raw_path))
    assert isinstance(response, web.Response)
    assert response.status == 405
    assert response.headers["Allow"] == allowed
    assert response.headers["X-Sidecar-Error"] == "method_not_allowed"
    assert calls.seen == []


async def test_without_a_checkout_every_path_is_proxied() -> None:
    calls = Calls()
    await plane(calls, path=None)(make_mocked_request("POST", "/checkout"))
    assert calls.seen == [("proxy", "checkout")]
    assert plane(calls, path=None).routes() == [("*", PROXY_ROUTE)]
