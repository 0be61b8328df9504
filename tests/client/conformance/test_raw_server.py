"""Cases real servers will not produce on demand, on a scripted asyncio server.

Each test gives the server a script: what to answer (byte for byte) to each request
on each connection, and when. The server counts connections and requests, so a test
can tell a reused connection from a new one and a resent request from a single one.
Synchronisation is by events the script sets or waits for, never by sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.client import BrokenBody, OutgoingRequest
from proxy.client.http11 import Http11Client
from proxy.client.http11.connection import HIGH_WATER
from proxy.resilience.outcome import RESPONSE, Kind, Outcome

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawServer:
    """Runs `script(reader, writer, connection_number)` for each connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.closed = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.closed.set()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One request head (and a Content-Length body), recorded."""
        head = await reader.readuntil(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                head += await reader.readexactly(int(line.split(b":")[1]))
        self.requests.append(head)
        return head

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Script], Awaitable[RawServer]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> RawServer:
        raw_server = RawServer(script)
        raw_server.server = await asyncio.start_server(raw_server.handle, "127.0.0.1", 0)
        servers.append(raw_server.server)
        return raw_server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
async def client() -> AsyncIterator[Http11Client]:
    http = Http11Client(connect_timeout=2.0, max_connections=4, keepalive=30.0)
    yield http
    await http.close()


def request(base: str, path: str = "/", method: str = "GET", **headers: str) -> OutgoingRequest:
    return OutgoingRequest(method, URL(base + path), CIMultiDict(headers))


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def answer_each(server_box: list[RawServer], answer: bytes) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            await server_box[0].read_request(reader)
            writer.write(answer)

    return script


async def test_100_and_103_before_the_final_answer_are_skipped(raw, client) -> None:
    box: list[RawServer] = []
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    )
    server = await raw(await answer_each(box, interim + OK))
    box.append(server)
    for _ in range(2):
        outcome = await client.send(request(server.url))
        assert (outcome.status, outcome.response.body) == (200, b"ok")
        assert "Link" not in outcome.response.headers
        outcome.response.let_go()
    assert server.connections == 1


async def test_a_body_without_length_ends_at_eof_and_the_connection_is_not_reused(
    raw, client
) -> None:
    async def script(reader, writer, n) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        writer.write(b"x" * 100_000)
        await writer.drain()
        writer.close()

    server = await raw(script)
    outcome = await client.send(request(server.url))
    assert outcome.response.content_length is None and outcome.response.body is None
    assert await outcome.response.read() == b"x" * 100_000
    outcome.response.let_go()
    again = await client.send(request(server.url))
    assert await again.response.read() == b"x" * 100_000
    again.response.let_go()
    assert server.connections == 2


async def test_an_http10_answer_without_keep_alive_closes_the_connection(raw, client) -> None:
    box: list[RawServer] = []
    server = await raw(await answer_each(box, b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    box.append(server)
    for _ in range(2):
        outcome = await client.send(request(server.url))
        assert outcome.response.body == b"ok"
        outcome.response.let_go()
    assert server.connections == 2


async def test_a_head_answer_with_a_chunked_header_leaves_the_connection_usable(
    raw, client
) -> None:
    async def script(reader, writer, n) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\n")
        await server.read_request(reader)
        writer.write(OK)
        await reader.read()

    server = await raw(script)
    for method, body in (("HEAD", b""), ("HEAD", b""), ("GET", b"ok")):
        outcome = await client.send(request(server.url, method=method))
        assert outcome.response.body == body
        outcome.response.let_go()
    assert server.connections == 1


async def test_a_reset_mid_body_is_a_broken_body_and_the_connection_closed(raw, client) -> None:
    async def script(reader, writer, n) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        writer.transport.abort()

    server = await raw(script)
    outcome = await client.send(request(server.url))
    with pytest.raises(BrokenBody) as broken:
        await outcome.response.read()
    assert broken.value.outcome.kind is Kind.RESET
    outcome.response.let_go()
    assert not client._pool.connections


async def test_a_small_body_broken_off_inside_send_is_a_reset(raw, client) -> None:
    async def script(reader, writer, n) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        await writer.drain()

    server = await raw(script)
    outcome = await client.send(request(server.url))
    assert (outcome.kind, outcome.detail) == (Kind.RESET, "response body broken off")


async def test_a_chunked_body_comes_piece_by_piece(raw, client) -> None:
    more = asyncio.Event()

    async def script(reader, writer, n) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await more.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await reader.read()

    server = await raw(script)
    outcome = await client.send(request(server.url))
    pieces = []
    async for piece in outcome.response.chunks(1024):
        pieces.append(piece)
        more.set()
    assert pieces == [b"first", b"second"]
    outcome.response.let_go()
    assert len(client._pool.connections) == 1


async def test_a_pooled_connection_found_closed_is_a_reset_and_not_resent(raw, client) -> None:
    async def script(reader, writer, n) -> None:
        await server.read_request(reader)
        writer.write(OK)
        await server.read_request(reader)  # the second request arrives ...
        writer.close()  # ... and the server closes without an answer

    server = await raw(script)
    first = await client.send(request(server.url))
    first.response.let_go()
    second = await client.send(request(server.url))
    assert (second.kind, second.detail) == (
        Kind.RESET,
        "server closed the connection without a response",
    )
    assert len(server.requests) == 2 and server.connections == 1, "sent once, not resent"


async def test_an_invalid_answer_is_a_reset_with_a_detail(raw, client) -> None:
    async def script(reader, writer, n) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 2x0 Nope\r\n\r\n")
        await reader.read()

    server = await raw(script)
    outcome = await client.send(request(server.url))
    assert outcome.kind is Kind.RESET
    assert outcome.detail.startswith("invalid response: ")


async def test_101_switching_protocols_is_refused(raw, client) -> None:
    async def script(reader, writer, n) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n")
        await reader.read()

    server = await raw(script)
    outcome = await client.send(request(server.url))
    assert outcome.kind is Kind.RESET
    assert "101" in outcome.detail


async def test_a_cancelled_send_closes_its_connection(raw, client) -> None:
    arrived = asyncio.Event()

    async def script(reader, writer, n) -> None:
        await server.read_request(reader)
        arrived.set()
        await reader.read()  # never answers; EOF when the client closes

    server = await raw(script)
    sending = asyncio.create_task(client.send(request(server.url)))
    await arrived.wait()
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    assert not client._pool.connections and client._pool.count == 0
    await server.closed.wait()  # the server saw the connection go


async def test_a_cancelled_read_closes_its_connection(raw, client) -> None:
    async def script(reader, writer, n) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"x" * 10)
        await reader.read()

    server = await raw(script)
    outcome = await client.send(request(server.url))
    reading = asyncio.create_task(outcome.response.read())
    await asyncio.sleep(0)  # let the read start waiting (ordering, not time)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    outcome.response.let_go()
    assert not client._pool.connections
    await server.closed.wait()


async def test_the_limit_queues_requests_first_come_first_served(raw) -> None:
    box: list[RawServer] = []
    server = await raw(await answer_each(box, OK))
    box.append(server)
    client = Http11Client(connect_timeout=2.0, max_connections=1, keepalive=30.0)
    try:
        first = await client.send(request(server.url, "/1"))
        order: list[str] = []

        async def queued(name: str) -> None:
            outcome = await client.send(request(server.url, f"/{name}"))
            order.append(name)
            outcome.response.let_go()

        waiting = [asyncio.create_task(queued(name)) for name in ("a", "b", "c")]
        await asyncio.sleep(0)  # all three are queued behind the one connection
        assert len(client._pool.waiters) == 3
        first.response.let_go()
        await asyncio.gather(*waiting)
        assert order == ["a", "b", "c"]
        assert server.connections == 1
    finally:
        await client.close()


async def test_idle_connections_expire_after_keepalive(raw) -> None:
    box: list[RawServer] = []
    server = await raw(await answer_each(box, OK))
    box.append(server)
    client = Http11Client(connect_timeout=2.0, max_connections=4, keepalive=0.05)
    try:
        outcome = await client.send(request(server.url))
        conn = outcome.response._conn
        outcome.response.let_go()
        assert conn is not None
        async with asyncio.timeout(5):
            await conn.lost  # the pool's sweep closed it
        assert not client._pool.connections and client._pool.count == 0
        again = await client.send(request(server.url))
        assert again.kind is RESPONSE
        again.response.let_go()
    finally:
        await client.close()


async def test_a_tls_handshake_that_never_ends_is_a_connect_timeout(raw) -> None:
    async def script(reader, writer, n) -> None:
        await reader.read()  # accepts TCP, never speaks TLS

    server = await raw(script)
    client = Http11Client(connect_timeout=0.2, max_connections=4, keepalive=30.0)
    try:
        outcome: Outcome = await client.send(request(server.url.replace("http:", "https:")))
    finally:
        await client.close()
    assert (outcome.kind, outcome.detail) == (Kind.CONNECT_FAILURE, "connect timeout")
    assert client._pool is None or client._pool.count == 0


async def test_a_refused_connect_is_a_connect_failure(client) -> None:
    outcome = await client.send(request("http://127.0.0.1:9"))
    assert outcome.kind is Kind.CONNECT_FAILURE


async def test_unexpected_bytes_on_an_idle_connection_drop_it(raw, client) -> None:
    async def script(reader, writer, n) -> None:
        await server.read_request(reader)
        writer.write(OK)
        await server.read_request(reader)
        writer.write(OK + b"HTTP/1.1 200 OK\r\n")  # more than was asked for
        await reader.read()

    server = await raw(script)
    for _ in range(2):
        outcome = await client.send(request(server.url))
        assert outcome.response.body == b"ok"
        outcome.response.let_go()
    async with asyncio.timeout(5):
        while client._pool.connections:
            await next(iter(client._pool.connections)).lost
    third = await client.send(request(server.url))
    assert third.response.body == b"ok"
    assert server.connections == 2


async def test_an_answer_before_the_whole_upload_ends_it_and_the_connection_is_not_reused(
    raw, client
) -> None:
    async def script(reader, writer, n) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
        await reader.read()

    server = await raw(script)
    answered = asyncio.Event()
    sent: list[bytes] = []

    async def upload() -> AsyncIterator[bytes]:
        sent.append(b"first")
        yield b"first"
        await answered.wait()
        sent.append(b"second")
        yield b"second"  # offered after the answer: not sent
        sent.append(b"never")  # the upload stops once the answer is in

    body = upload()
    sending = asyncio.create_task(
        client.send(OutgoingRequest("PUT", URL(server.url + "/up"), CIMultiDict(), body))
    )
    # the client's parser has no event to await: yield to the loop until it has read the
    # answer (no time is assumed, only that the loop runs the connection's callbacks)
    async with asyncio.timeout(5):
        while not client._pool or not client._pool.connections:  # noqa: ASYNC110
            await asyncio.sleep(0)
        conn = next(iter(client._pool.connections))
        while not conn._complete:  # noqa: ASYNC110
            await asyncio.sleep(0)
    answered.set()
    outcome = await sending
    assert (outcome.status, outcome.response.body) == (413, b"")
    assert sent == [b"first", b"second"]
    outcome.response.let_go()
    assert conn.closed, "the upstream still expects the rest of the body"
    await body.aclose()


async def test_a_closed_pool_breaks_a_body_being_read_off_as_a_broken_body(raw, client) -> None:
    async def script(reader, writer, n) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"x" * 10)
        await reader.read()

    server = await raw(script)
    outcome = await client.send(request(server.url))
    reading = asyncio.create_task(outcome.response.read())
    await asyncio.sleep(0)  # the read is waiting for more (ordering, not time)
    await client.close()
    with pytest.raises(BrokenBody) as broken:
        await reading
    assert broken.value.outcome.kind is Kind.RESET
    outcome.response.let_go()


async def test_a_connection_paused_by_an_unread_last_burst_reads_again_when_reused(
    raw, client
) -> None:
    # The body's last burst must cross HIGH_WATER and end the message in one read. Written
    # at once, 300 KB may arrive in pieces on a loaded machine and pause reading before its
    # end; so the server sends HIGH_WATER bytes, waits until they are in, then the rest.
    tail = 1_000
    first_in = asyncio.Event()

    async def script(reader, writer, n) -> None:
        await server.read_request(reader)
        length = HIGH_WATER + tail
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length)
        writer.write(b"x" * HIGH_WATER)
        await first_in.wait()
        writer.write(b"x" * tail)
        await server.read_request(reader)
        writer.write(OK)
        await reader.read()

    server = await raw(script)
    outcome = await client.send(request(server.url))
    conn = outcome.response._conn
    assert conn is not None
    async with asyncio.timeout(30):  # HIGH_WATER in: not over it, so still reading
        while conn._buffered < HIGH_WATER:  # noqa: ASYNC110
            await asyncio.sleep(0)
    assert not conn._read_paused
    first_in.set()
    async with asyncio.timeout(30):  # the whole body in, reading paused, nothing read
        while not conn._complete:  # noqa: ASYNC110
            await asyncio.sleep(0)
    assert conn._read_paused
    outcome.response.let_go()
    again = await asyncio.wait_for(client.send(request(server.url)), 30)
    assert again.response.body == b"ok"
    again.response.let_go()
    assert server.connections == 1
