"""The HTTP/1.1 client inside the sidecar: what the upstream sees, and how the pool behaves."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from proxy.client.http11 import Http11Client


async def test_upstreams_use_our_http11_client(start_sidecar) -> None:
    sidecar, _ = await start_sidecar({"upstreams": {"payment": {"url": "http://127.0.0.1:9"}}})
    upstream = sidecar.runtime.upstreams.get("payment")
    assert upstream is not None
    assert isinstance(upstream.client, Http11Client)


async def test_repeated_header_names_are_forwarded_in_order(start_server, start_sidecar) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.json_response(request.headers.getall("X-Tag"))

    app = web.Application()
    app.router.add_get("/tags", echo)
    server = await start_server(app)
    _, base = await start_sidecar(
        {"upstreams": {"tags": {"url": str(server.make_url("")).rstrip("/")}}}
    )
    async with aiohttp.ClientSession() as client:
        headers = [("X-Tag", "a"), ("X-Tag", "b")]
        async with client.get(f"{base}/tags/tags", headers=headers) as response:
            assert await response.json() == ["a", "b"]
