"""The same HTTP/1.1 cases against aiohttp, httpbin under gunicorn, and nginx.

What each case checks is what the proxy relies on: bodies arrive whole and unchanged
(Content-Length, chunked, compressed), connections are reused when the upstream
allows it and dropped when it does not (or when it closed them while idle), and
answers without a body leave the connection usable. A server that cannot produce a
case skips it with the reason; `test_raw_server.py` covers those on a scripted server.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections.abc import AsyncIterator

import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.client import BrokenBody, OutgoingRequest
from proxy.client.http11 import Http11Client
from proxy.resilience.outcome import RESPONSE, Kind, Outcome
from tests.client.conformance.conftest import (
    BIG_HEADER_COUNT,
    AiohttpUpstream,
    Upstream,
    big_header_value,
)


def _url(upstream: Upstream, path: str) -> URL:
    return URL(path if path.startswith("http") else upstream.base + path, encoded=True)


async def send(
    client: Http11Client,
    upstream: Upstream,
    path: str | None,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | AsyncIterator[bytes] | None = None,
) -> Outcome:
    if path is None:
        pytest.skip(f"{upstream.name} cannot produce this case (see test_raw_server.py)")
    request = OutgoingRequest(method, _url(upstream, path), CIMultiDict(headers or {}), body)
    outcome = await client.send(request)
    assert outcome.kind is RESPONSE, outcome
    return outcome


def connections(client: Http11Client) -> set[object]:
    """The client's open connections (its pool is private; the suite looks inside)."""
    pool = client._pool
    return set() if pool is None else set(pool.connections)


async def server_connection(client: Http11Client, upstream: Upstream) -> object:
    """Which connection served a request: the server's id when it tells, else ours."""
    if upstream.connection_id is not None:
        outcome = await send(client, upstream, upstream.connection_id)
        text = await outcome.response.read()
        outcome.response.let_go()
        return text
    outcome = await send(client, upstream, "/get")
    conn = outcome.response._conn
    outcome.response.let_go()
    return conn


async def test_a_content_length_body_over_64k_streams_whole(
    client: Http11Client, upstream: Upstream
) -> None:
    outcome = await send(client, upstream, upstream.big_file)
    response = outcome.response
    assert response.body is None, "over SMALL_BODY: left to be streamed"
    assert response.content_length == len(upstream.big_body)
    pieces = [piece async for piece in response.chunks(16 * 1024)]
    assert all(len(piece) <= 16 * 1024 for piece in pieces)
    assert b"".join(pieces) == upstream.big_body
    response.let_go()
    assert len(connections(client)) == 1, "read to its end: back in the pool"


async def test_a_chunked_body_reads_whole(client: Http11Client, upstream: Upstream) -> None:
    outcome = await send(client, upstream, upstream.chunked)
    response = outcome.response
    assert "chunked" in response.headers.get("Transfer-Encoding", "")
    assert response.content_length is None
    body = await response.read()
    if upstream.chunked_body is not None:
        assert body == upstream.chunked_body
    else:
        assert len(body) == upstream.chunked_length
    response.let_go()
    again = await server_connection(client, upstream)
    assert again is not None and len(connections(client)) == 1


async def _uploaded(
    client: Http11Client, upstream: Upstream, name: str, body: bytes, stream: bool
) -> tuple[bytes | None, dict[str, object]]:
    """Send `body` (as bytes, or as a stream of pieces); what the server says it got."""

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 7000):
            yield body[start : start + 7000]

    data: bytes | AsyncIterator[bytes] = pieces() if stream else body
    path = upstream.upload
    if path is None:
        pytest.skip(f"{upstream.name} takes no uploads")
    if upstream.name == "nginx":
        path += name
    outcome = await send(client, upstream, path, upstream.upload_method, body=data)
    answer = await outcome.response.read()
    outcome.response.let_go()
    if upstream.name == "nginx":  # WebDAV PUT stored it: read it back
        assert outcome.status in (201, 204), outcome
        stored = await send(client, upstream, path)
        got = await stored.response.read()
        stored.response.let_go()
        return got, {}
    seen = json.loads(answer)
    if upstream.name == "httpbin":
        return seen["data"].encode(), seen["headers"]
    return None, seen


@pytest.mark.parametrize(
    ("size", "stream"),
    [(50_000, False), (200_000, False), (50_000, True)],
    ids=["content-length", "content-length-over-64k", "chunked"],
)
async def test_request_bodies_arrive_whole(
    client: Http11Client, upstream: Upstream, size: int, stream: bool
) -> None:
    body = bytes(65 + n % 26 for n in range(size))
    got, seen = await _uploaded(client, upstream, f"up-{size}-{stream}.bin", body, stream)
    if upstream.name == "aiohttp":
        assert seen["length"] == len(body)
        assert seen["sha256"] == hashlib.sha256(body).hexdigest()
        assert seen["chunked"] is stream
        assert seen["content_length"] == (None if stream else str(len(body)))
    else:
        assert got == body
    if upstream.name == "httpbin" and not stream:
        assert seen["Content-Length"] == str(len(body))


async def test_keep_alive_reuses_one_connection(client: Http11Client, upstream: Upstream) -> None:
    first = await server_connection(client, upstream)
    second = await server_connection(client, upstream)
    assert first == second
    assert len(connections(client)) == 1


async def test_an_idle_connection_the_upstream_closed_is_replaced_not_failed(
    client: Http11Client, upstream: Upstream
) -> None:
    outcome = await send(client, upstream, upstream.idle_close)
    await outcome.response.read()
    conn = outcome.response._conn
    outcome.response.let_go()
    assert conn is not None and connections(client) == {conn}
    closer = upstream.extra.get("close_idle")
    if callable(closer):
        closer()  # aiohttp's idle timeout is long: the test closes it from the server side
    async with asyncio.timeout(5):
        await conn.lost  # the upstream closed it while idle: the loop saw it
    assert connections(client) == set(), "left the pool at once"

    again = await send(client, upstream, upstream.idle_close)
    await again.response.read()
    assert again.response._conn is not conn
    again.response.let_go()


async def test_connection_close_from_the_upstream_is_honoured(
    client: Http11Client, upstream: Upstream
) -> None:
    outcome = await send(client, upstream, upstream.close)
    assert outcome.response.headers.get("Connection", "").lower() == "close"
    await outcome.response.read()
    conn = outcome.response._conn
    outcome.response.let_go()
    assert conn is not None and conn.closed, "not kept for reuse"
    assert connections(client) == set()
    again = await send(client, upstream, upstream.close)
    assert again.response._conn is not conn
    again.response.let_go()


async def test_head_204_and_304_have_no_body_and_keep_the_connection(
    client: Http11Client, upstream: Upstream
) -> None:
    head = await send(client, upstream, upstream.big_file, "HEAD")
    assert head.response.body == b""
    assert head.response.content_length == len(upstream.big_body)
    conn = head.response._conn
    head.response.let_go()

    empty = await send(client, upstream, upstream.no_content)
    assert (empty.status, empty.response.body) == (204, b"")
    assert empty.response._conn is conn
    empty.response.let_go()

    path = upstream.not_modified
    first = await send(client, upstream, path)
    etag = first.response.headers.get("ETag", '"v1"')
    await first.response.read()
    first.response.let_go()
    unchanged = await send(client, upstream, path, headers={"If-None-Match": etag})
    assert (unchanged.status, unchanged.response.body) == (304, b"")
    assert unchanged.response._conn is conn
    unchanged.response.let_go()

    after = await send(client, upstream, upstream.big_file)
    assert await after.response.read() == upstream.big_body
    assert after.response._conn is conn
    after.response.let_go()


async def test_100_continue_is_skipped_for_the_final_answer(
    client: Http11Client, upstream: Upstream
) -> None:
    body = b"z" * 5000

    async def later() -> AsyncIterator[bytes]:
        await asyncio.sleep(0)  # the head goes out alone: the server may answer 100 first
        yield body

    path = upstream.upload
    if upstream.name == "nginx":
        path = f"{path}continue.bin"
    headers = {"Expect": "100-continue", "Content-Length": str(len(body))}
    outcome = await send(client, upstream, path, upstream.upload_method, headers, later())
    assert outcome.status in (200, 201, 204)
    await outcome.response.read()
    outcome.response.let_go()


async def test_103_early_hints_are_skipped(client: Http11Client, upstream: Upstream) -> None:
    outcome = await send(client, upstream, upstream.early_hints)
    assert (outcome.status, outcome.response.body) == (200, b"final")
    assert "Link" not in outcome.response.headers
    outcome.response.let_go()


async def test_a_reset_mid_body_is_a_broken_body(client: Http11Client, upstream: Upstream) -> None:
    outcome = await send(client, upstream, upstream.broken)
    with pytest.raises(BrokenBody) as broken:
        async for _ in outcome.response.chunks(4096):
            pass
    assert broken.value.outcome.kind is Kind.RESET
    outcome.response.let_go()
    assert connections(client) == set()


async def test_a_slow_body_is_yielded_as_it_comes(client: Http11Client, upstream: Upstream) -> None:
    outcome = await send(client, upstream, upstream.slow)
    server = upstream.extra.get("server")
    pieces: list[bytes] = []
    async for piece in outcome.response.chunks(64 * 1024):
        pieces.append(piece)
        if isinstance(server, AiohttpUpstream) and len(pieces) == 1:
            assert piece == b"1" * 1000, "the first piece before the rest was sent"
            server.slow_gate.set()
    outcome.response.let_go()
    assert len(pieces) >= 2
    if upstream.name == "nginx":
        assert b"".join(pieces) == upstream.big_body
    else:
        assert b"".join(pieces) == b"1" * 1000 + b"2" * 1000 + b"3" * 1000


async def test_a_32k_response_head_is_read(client: Http11Client, upstream: Upstream) -> None:
    outcome = await send(client, upstream, upstream.big_headers)
    headers = outcome.response.headers
    for n in range(BIG_HEADER_COUNT):
        assert headers[f"X-Big-{n}"] == big_header_value(n)
    await outcome.response.read()
    outcome.response.let_go()


async def test_compressed_bodies_pass_untouched(client: Http11Client, upstream: Upstream) -> None:
    outcome = await send(client, upstream, upstream.gzipped, headers={"Accept-Encoding": "gzip"})
    response = outcome.response
    assert response.headers["Content-Encoding"] == "gzip"
    body = await response.read()
    if upstream.gzipped_body is not None:
        assert body == upstream.gzipped_body
    assert response.content_length in (None, len(body))
    assert gzip.decompress(body)  # still compressed: the client did not inflate it
    response.let_go()
