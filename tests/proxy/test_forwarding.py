"""Forwarding through a real sidecar to real loopback upstreams."""

from __future__ import annotations

import gzip
import hashlib

import aiohttp
from aiohttp import web

from tests.conftest import StartServer


def echo_app() -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": {k: v for k, v in request.headers.items()},
                "length": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
            }
        )

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(b"hello " * 100),
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
        )

    async def hop(request: web.Request) -> web.Response:
        return web.Response(
            text="ok",
            headers={"Connection": "keep-alive, X-Private", "X-Private": "1", "X-Public": "2"},
        )

    async def stream(request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["n"])
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        chunk = b"x" * 65536
        sent = 0
        while sent < size and request.method != "HEAD":
            part = chunk[: min(len(chunk), size - sent)]
            await response.write(part)
            sent += len(part)
        await response.write_eof()
        return response

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"status": "x"}, status=int(request.match_info["code"]))

    app = web.Application(client_max_size=1024**3)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/hop", hop)
    app.router.add_get("/stream/{n}", stream)
    app.router.add_get("/status/{code}", status)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def _sidecar_for(start_server: StartServer, start_sidecar, app: web.Application, **policy):
    server = await start_server(app)
    upstream = {"url": str(server.make_url("")).rstrip("/"), **policy}
    _, base = await start_sidecar({"upstreams": {"inventory": upstream}})
    return base, server


async def test_path_and_query_are_kept_with_their_encoding(start_server, start_sidecar) -> None:
    base, _ = await _sidecar_for(start_server, start_sidecar, echo_app())
    async with aiohttp.ClientSession() as client:
        url = f"{base}/inventory/items/a%2Fb?q=1&r=%20x"
        async with client.get(url) as response:
            assert response.status == 200
            data = await response.json()
    assert data["path"] == "/items/a%2Fb?q=1&r=%20x"


async def test_unknown_upstream_is_a_json_404(start_server, start_sidecar) -> None:
    base, _ = await _sidecar_for(start_server, start_sidecar, echo_app())
    async with aiohttp.ClientSession() as client, client.get(f"{base}/nope/x") as response:
        assert response.status == 404
        body = await response.json()
    assert body["reason"] == "unknown_upstream"
    assert body["upstream"] == "nope"
    assert body["known"] == ["inventory"]


async def test_hop_by_hop_headers_are_removed_and_forwarded_headers_added(
    start_server, start_sidecar
) -> None:
    base, server = await _sidecar_for(start_server, start_sidecar, echo_app())
    headers = {
        "Connection": "keep-alive, X-Secret-Hop",
        "X-Secret-Hop": "1",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic abc",
        "TE": "trailers",
        "Upgrade": "h2c",
        "X-Forwarded-For": "10.1.2.3",
        "X-Custom": "kept",
    }
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{base}/inventory/h", headers=headers) as response:
            seen = (await response.json())["headers"]
    lowered = {k.lower(): v for k, v in seen.items()}
    for gone in ("x-secret-hop", "keep-alive", "proxy-authorization", "te", "upgrade"):
        assert gone not in lowered, gone
    assert lowered["x-custom"] == "kept"
    assert lowered["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    assert lowered["x-forwarded-proto"] == "http"
    assert lowered["x-forwarded-host"] == base.removeprefix("http://")
    assert lowered["host"] == f"127.0.0.1:{server.port}"
    assert int(lowered["x-request-timeout-ms"]) <= 1000


async def test_response_hop_by_hop_headers_are_removed(start_server, start_sidecar) -> None:
    base, _ = await _sidecar_for(start_server, start_sidecar, echo_app())
    async with aiohttp.ClientSession() as client, client.get(f"{base}/inventory/hop") as response:
        assert response.headers["X-Public"] == "2"
        assert "X-Private" not in response.headers
        assert response.headers["X-Sidecar-Attempts"] == "1"


async def test_redirects_are_passed_through_not_followed(start_server, start_sidecar) -> None:
    base, _ = await _sidecar_for(start_server, start_sidecar, echo_app())
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{base}/inventory/redirect", allow_redirects=False) as response:
            assert response.status == 302
            assert response.headers["Location"] == "/elsewhere"


async def test_compressed_bodies_pass_through_untouched(start_server, start_sidecar) -> None:
    base, _ = await _sidecar_for(start_server, start_sidecar, echo_app())
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.get(f"{base}/inventory/gzip") as response:
            raw = await response.read()
            assert response.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(raw) == b"hello " * 100


async def test_status_codes_pass_through_unchanged(start_server, start_sidecar) -> None:
    base, _ = await _sidecar_for(start_server, start_sidecar, echo_app())
    async with aiohttp.ClientSession() as client:
        for code in (201, 404, 409, 418, 500):
            async with client.get(f"{base}/inventory/status/{code}") as response:
                assert response.status == code


async def test_large_request_body_is_streamed_upstream_intact(start_server, start_sidecar) -> None:
    base, _ = await _sidecar_for(start_server, start_sidecar, echo_app())
    payload = bytes(range(256)) * 40_000  # 10 MB, well over the retry buffer

    async def chunks():
        for i in range(0, len(payload), 1 << 20):
            yield payload[i : i + (1 << 20)]

    async with aiohttp.ClientSession() as client:
        async with client.post(f"{base}/inventory/upload", data=chunks()) as response:
            assert response.status == 200
            data = await response.json()
    assert data["length"] == len(payload)
    assert data["sha256"] == hashlib.sha256(payload).hexdigest()


async def test_large_response_body_is_streamed_to_the_client(start_server, start_sidecar) -> None:
    base, _ = await _sidecar_for(start_server, start_sidecar, echo_app())
    size = 20 * 1024 * 1024
    received = 0
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{base}/inventory/stream/{size}") as response:
            assert response.headers["Content-Length"] == str(size)
            async for chunk in response.content.iter_chunked(1 << 16):
                received += len(chunk)
    assert received == size


async def test_a_body_over_the_limit_is_refused_with_413(start_server, start_sidecar) -> None:
    base, _ = await _sidecar_for(start_server, start_sidecar, echo_app(), max_request_body="1KiB")
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{base}/inventory/x", data=b"y" * 2048) as response:
            assert response.status == 413
            body = await response.json()
    assert body["reason"] == "payload_too_large"


async def test_a_chunked_body_growing_over_the_limit_is_refused_with_413(
    start_server, start_sidecar
) -> None:
    base, _ = await _sidecar_for(
        start_server,
        start_sidecar,
        echo_app(),
        max_request_body="256KiB",
        retry={"buffer_limit": "16KiB"},
    )

    async def chunks():
        for _ in range(40):
            yield b"z" * 16384

    async with aiohttp.ClientSession() as client:
        async with client.post(f"{base}/inventory/x", data=chunks()) as response:
            assert response.status == 413


async def test_a_bad_timeout_header_is_a_json_400(start_server, start_sidecar) -> None:
    base, _ = await _sidecar_for(start_server, start_sidecar, echo_app())
    async with aiohttp.ClientSession() as client:
        headers = {"X-Request-Timeout-Ms": "soon"}
        async with client.get(f"{base}/inventory/x", headers=headers) as response:
            assert response.status == 400
            assert "X-Request-Timeout-Ms" in (await response.json())["error"]


async def test_the_callers_timeout_is_passed_on_shortened(start_server, start_sidecar) -> None:
    base, _ = await _sidecar_for(start_server, start_sidecar, echo_app())
    async with aiohttp.ClientSession() as client:
        headers = {"X-Request-Timeout-Ms": "400"}
        async with client.get(f"{base}/inventory/x", headers=headers) as response:
            seen = (await response.json())["headers"]
    assert 0 < int(seen["X-Request-Timeout-Ms"]) <= 400


async def test_head_keeps_content_length_without_a_body(start_server, start_sidecar) -> None:
    base, _ = await _sidecar_for(start_server, start_sidecar, echo_app())
    async with aiohttp.ClientSession() as client:
        async with client.head(f"{base}/inventory/stream/1000") as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == "1000"
