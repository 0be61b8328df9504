"""Real upstreams on loopback for the client's conformance suite.

Three servers written by others, so the client is checked against more than our own
idea of HTTP/1.1: an aiohttp app (in this process, on the test's loop), httpbin under
gunicorn (a WSGI stack: Werkzeug parsing, gunicorn framing) and nginx. gunicorn and
nginx are started once per session as subprocesses on free ports; a missing binary
skips that upstream's cases with the reason. Each upstream says which URL serves
which case (`Upstream`), or None when that server cannot produce it; the raw asyncio
server in `test_raw_server.py` covers those.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from proxy.client.http11 import Http11Client
from tests.operations import free_port

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
BIG_FILE = bytes(range(256)) * 1200  # 300 KiB: over SMALL_BODY, streamed
TEXT = b"a banana and a papaya\n" * 400  # nginx's sub_filter turns it into a chunked body
GZIPPED = gzip.compress(b"hello, compressed world\n" * 200, mtime=0)
BIG_HEADER_COUNT = 32  # headers of 1 KiB each: a 32 KiB response head


@dataclass
class Upstream:
    """A running upstream and the paths that make it produce each case (None: cannot)."""

    name: str
    base: str
    connection_id: str | None  # a path answering with the server's id of the connection
    idle_close: str | None  # a path after which the server closes the idle connection soon
    close: str | None  # a path answered with `Connection: close`
    big_file: str | None  # a Content-Length body over SMALL_BODY: `big_body`
    chunked: str | None  # a chunked body; `chunked_body` is what it must read as
    chunked_body: bytes | None = None  # None: only its length (`chunked_length`) is known
    chunked_length: int = 0
    big_body: bytes = BIG_FILE
    gzipped: str | None = None  # a gzip body, sent as it is; `gzipped_body` when known
    gzipped_body: bytes | None = None
    no_content: str | None = None  # answers 204
    not_modified: str | None = None  # answers 304 to If-None-Match with the ETag it gave
    big_headers: str | None = None  # a 32 KiB head
    slow: str | None = None  # a body in pieces over time
    broken: str | None = None  # a body broken off after some bytes
    early_hints: str | None = None  # 103 before the answer
    upload: str | None = None  # PUT/POST a body here; `uploaded(client, path)` reads it back
    upload_method: str = "POST"
    extra: dict[str, object] = field(default_factory=dict)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    """Block until `port` accepts (a subprocess's readiness; no event to await here)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within 15 s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def _gunicorn(port: int, tmp: Path, *args: str) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "-b",
        f"127.0.0.1:{port}",
        "-w",
        "1",
        "--no-control-socket",
        "--limit-request-line",
        "0",
        *args,
        "httpbin:app",
    ]
    log = open(tmp / f"gunicorn-{port}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)


@pytest.fixture(scope="session")
def httpbin_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """httpbin twice: gthread workers (keep-alive, 1 s idle) and sync ones (always close)."""
    try:
        import gunicorn  # noqa: F401
        import httpbin  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"httpbin/gunicorn not installed ({exc}): pip install -e '.[test]'")
    tmp = tmp_path_factory.mktemp("httpbin")
    keep, close = free_port(), free_port()
    started = [
        _gunicorn(keep, tmp, "-k", "gthread", "--threads", "4", "--keep-alive", "1"),
        _gunicorn(close, tmp, "-k", "sync"),
    ]
    try:
        _wait_for_port(keep, started[0], "gunicorn (gthread)")
        _wait_for_port(close, started[1], "gunicorn (sync)")
        yield f"http://127.0.0.1:{keep}", f"http://127.0.0.1:{close}"
    finally:
        for process in started:
            _stop(process)


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 128; }}
http {{
    access_log off;
    default_type text/plain;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_timeout 30s;
    server {{
        listen 127.0.0.1:{port};
        root {tmp}/www;
        location /static/ {{ etag on; }}
        location /gz/ {{ gzip_static on; }}
        location /slow/ {{ alias {tmp}/www/static/; limit_rate 2m; sendfile off; }}
        location /chunked/ {{
            sub_filter 'a' 'A';
            sub_filter_once off;
            sub_filter_types *;
        }}
        location /dav/ {{
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 10m;
        }}
        location = /conn {{ return 200 "$connection"; }}
        location = /idle {{ keepalive_timeout 100ms; return 200 "$connection"; }}
        location = /close {{ keepalive_timeout 0; return 200 "$connection"; }}
        location = /204 {{ return 204; }}
        location = /big-headers {{
{big_headers}
            return 200 "big";
        }}
    }}
}}
"""


def big_header_value(n: int) -> str:
    return f"{n:04d}" + "v" * 1020


@pytest.fixture(scope="session")
def nginx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if NGINX is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx-light)")
    tmp = tmp_path_factory.mktemp("nginx")
    www = tmp / "www"
    for sub in ("static", "gz", "chunked", "dav"):
        (www / sub).mkdir(parents=True)
    (www / "static" / "big.bin").write_bytes(BIG_FILE)
    (www / "gz" / "data.txt.gz").write_bytes(GZIPPED)
    (www / "gz" / "data.txt").write_bytes(gzip.decompress(GZIPPED))
    (www / "chunked" / "text.txt").write_bytes(TEXT)
    port = free_port()
    headers = "\n".join(
        f'            add_header X-Big-{n} "{big_header_value(n)}";'
        for n in range(BIG_HEADER_COUNT)
    )
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, port=port, big_headers=headers))
    log = open(tmp / "stderr.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [NGINX, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for_port(port, process, f"nginx (see {tmp}/error.log)")
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(process)
        log.close()


class AiohttpUpstream:
    """The aiohttp app: every case, with hooks the tests use to drive it."""

    def __init__(self) -> None:
        self.transports: list[asyncio.Transport] = []
        self.slow_gate = asyncio.Event()
        self.runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        routes = [
            ("GET", "/conn", self.conn),
            ("GET", "/idle", self.conn),
            ("GET", "/close", self.close),
            ("GET", "/big.bin", self.big),
            ("HEAD", "/big.bin", self.big),
            ("GET", "/chunked", self.chunked),
            ("GET", "/gzip", self.gzipped),
            ("GET", "/204", self.no_content),
            ("GET", "/etag", self.etag),
            ("GET", "/big-headers", self.big_headers),
            ("GET", "/slow", self.slow),
            ("GET", "/broken", self.broken),
            ("GET", "/early-hints", self.early_hints),
            ("POST", "/upload", self.upload),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
        return app

    def _peer(self, request: web.Request) -> str:
        transport = request.transport
        assert transport is not None
        if transport not in self.transports:
            self.transports.append(transport)  # type: ignore[arg-type]
        return str(transport.get_extra_info("peername")[1])

    async def conn(self, request: web.Request) -> web.Response:
        return web.Response(text=self._peer(request))

    async def close(self, request: web.Request) -> web.Response:
        response = web.Response(text=self._peer(request))
        response.force_close()
        return response

    async def big(self, request: web.Request) -> web.Response:
        return web.Response(body=BIG_FILE, content_type="application/octet-stream")

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(TEXT), 1000):
            await response.write(TEXT[start : start + 1000])
        await response.write_eof()
        return response

    async def gzipped(self, request: web.Request) -> web.Response:
        return web.Response(body=GZIPPED, headers={"Content-Encoding": "gzip"})

    async def no_content(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def etag(self, request: web.Request) -> web.Response:
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"'})
        return web.Response(text="v1", headers={"ETag": '"v1"'})

    async def big_headers(self, request: web.Request) -> web.Response:
        headers = {f"X-Big-{n}": big_header_value(n) for n in range(BIG_HEADER_COUNT)}
        return web.Response(text="big", headers=headers)

    async def slow(self, request: web.Request) -> web.StreamResponse:
        """Three chunks; the second only after the test saw the first (the gate)."""
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"1" * 1000)
        await self.slow_gate.wait()
        await response.write(b"2" * 1000)
        await response.write(b"3" * 1000)
        await response.write_eof()
        return response

    async def broken(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 100_000
        await response.prepare(request)
        await response.write(b"x" * 10_000)
        assert request.transport is not None
        request.transport.abort()  # a reset, not a clean close
        return response

    async def early_hints(self, request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.write(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        )
        return web.Response(text="final")

    async def upload(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "length": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
                "chunked": "chunked" in request.headers.get("Transfer-Encoding", ""),
                "content_length": request.headers.get("Content-Length"),
            }
        )


async def start_aiohttp_upstream() -> tuple[Upstream, web.AppRunner]:
    server = AiohttpUpstream()
    runner = web.AppRunner(server.app(), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    upstream = Upstream(
        name="aiohttp",
        base=f"http://127.0.0.1:{port}",
        connection_id="/conn",
        idle_close="/idle",
        close="/close",
        big_file="/big.bin",
        chunked="/chunked",
        chunked_body=TEXT,
        gzipped="/gzip",
        gzipped_body=GZIPPED,
        no_content="/204",
        not_modified="/etag",
        big_headers="/big-headers",
        slow="/slow",
        broken="/broken",
        early_hints="/early-hints",
        upload="/upload",
    )
    upstream.extra["server"] = server
    upstream.extra["close_idle"] = lambda: server.transports[-1].close()
    return upstream, runner


def httpbin_upstream(base: str, close_base: str) -> Upstream:
    return Upstream(
        name="httpbin",
        base=base,
        connection_id=None,  # gunicorn does not tell; the client's pool is counted instead
        idle_close="/get",  # gthread closes connections idle for --keep-alive (1 s)
        close=f"{close_base}/get",  # sync workers answer every request with Connection: close
        big_file="/range/100000",
        big_body=bytes(97 + n % 26 for n in range(100_000)),
        chunked="/stream-bytes/30000?seed=7&chunk_size=1000",
        chunked_length=30_000,
        gzipped="/gzip",
        no_content="/status/204",
        not_modified="/etag/v1",  # with If-None-Match: "v1"
        big_headers="/response-headers?"
        + "&".join(f"X-Big-{n}={big_header_value(n)}" for n in range(BIG_HEADER_COUNT)),
        slow=None,  # /drip sends a small Content-Length body: it is read whole in `send`
        broken=None,
        early_hints=None,
        upload="/anything",
    )


def nginx_upstream(base: str) -> Upstream:
    return Upstream(
        name="nginx",
        base=base,
        connection_id="/conn",
        idle_close="/idle",
        close="/close",
        big_file="/static/big.bin",
        chunked="/chunked/text.txt",
        chunked_body=TEXT.replace(b"a", b"A"),
        gzipped="/gz/data.txt",
        gzipped_body=GZIPPED,
        no_content="/204",
        not_modified="/static/big.bin",  # with the ETag it gave
        big_headers="/big-headers",
        slow="/slow/big.bin",  # limit_rate: 300 KiB in pieces over ~0.15 s
        broken=None,
        early_hints=None,
        upload="/dav/",
        upload_method="PUT",
    )


@pytest.fixture(params=["aiohttp", "httpbin", "nginx"])
async def upstream(request: pytest.FixtureRequest) -> AsyncIterator[Upstream]:
    """Each upstream in turn: the aiohttp app on the test's loop, the others shared."""
    if request.param == "aiohttp":
        started, runner = await start_aiohttp_upstream()
        try:
            yield started
        finally:
            server = started.extra["server"]
            assert isinstance(server, AiohttpUpstream)
            server.slow_gate.set()
            await runner.cleanup()
    elif request.param == "httpbin":
        keep, close = request.getfixturevalue("httpbin_servers")
        yield httpbin_upstream(keep, close)
    else:
        yield nginx_upstream(request.getfixturevalue("nginx_server"))


@pytest.fixture
async def client() -> AsyncIterator[Http11Client]:
    http = Http11Client(connect_timeout=2.0, max_connections=8, keepalive=30.0)
    try:
        yield http
    finally:
        await http.close()
