"""The proxied hot path skips ClientSession.request; this pins what that relies on."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from proxy.client.aiohttp_client import AiohttpClient, _direct_ok


def test_aiohttp_is_the_minor_version_the_direct_path_was_checked_against() -> None:
    # _direct_request repeats ClientSession._request of aiohttp 3.14 step by step; a new
    # minor version must be re-checked against it before this bound moves
    assert aiohttp.__version__.startswith("3.14.")


async def test_upstream_sessions_qualify_for_the_direct_path(start_sidecar) -> None:
    sidecar, _ = await start_sidecar({"upstreams": {"payment": {"url": "http://127.0.0.1:9"}}})
    client = sidecar.runtime.upstreams.get("payment").client
    assert isinstance(client, AiohttpClient)
    assert _direct_ok(client.session)


async def test_a_session_with_extra_features_falls_back_to_the_public_api() -> None:
    async with aiohttp.ClientSession() as session:  # a cookie jar, trust_env off, defaults
        assert not _direct_ok(session)


async def test_repeated_header_names_are_forwarded_through_the_fallback(
    start_server, start_sidecar
) -> None:
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
