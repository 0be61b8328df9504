"""A malformed request is the client's fault: one info line and a counter, no traceback.

Raw bytes over a socket to the real process's data listener, the way a broken or
hostile client sends them; the sidecar answers 400, logs one `bad_request` line,
counts `sidecar_bad_requests_total{reason}` and goes on serving.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.observability.badrequests import BAD_REQUEST_REASONS
from tests.conftest import StartServer
from tests.operations import SidecarProcess
from tests.operations.test_logs import config_data

BAD_REQUESTS = {
    "bad_content_length": (
        b"POST /backend/hello HTTP/1.1\r\nHost: sidecar\r\nContent-Length: -1\r\n\r\n"
    ),
    "header_too_large": (
        b"GET /backend/hello HTTP/1.1\r\nHost: sidecar\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    ),
    "bad_chunk": (
        b"POST /backend/hello HTTP/1.1\r\nHost: sidecar\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nhello\r\n0\r\n\r\n"
    ),
    "bad_request_line": b"GET /backend/hello HTTP/9.x\r\nHost: sidecar\r\n\r\n",
}


@pytest.fixture
async def backend(start_server: StartServer) -> TestServer:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": True})

    app = web.Application()
    app.router.add_get("/hello", hello)
    return await start_server(app)


async def send_raw(url: str, data: bytes) -> bytes:
    """Send `data` on a new connection; what came back before the sidecar closed it."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def bad_request_counts(http: aiohttp.ClientSession, admin: str) -> dict[str, float]:
    async with http.get(f"{admin}/metrics") as response:
        text = await response.text()
    counts = {}
    for family in text_string_to_metric_families(text):
        if family.name == "sidecar_bad_requests":
            for sample in family.samples:
                if sample.name == "sidecar_bad_requests_total":
                    counts[sample.labels["reason"]] = sample.value
    return counts


async def test_a_malformed_request_is_one_info_line_and_a_count(
    backend: TestServer, tmp_path: Path
) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config_data(backend, tmp_path)))
    sidecar = await SidecarProcess(path).start()
    try:
        async with aiohttp.ClientSession() as http:
            before = await bad_request_counts(http, sidecar.admin)
            for data in BAD_REQUESTS.values():
                answer = await send_raw(sidecar.listen, data)
                assert answer.split(b" ", 2)[1] == b"400", answer[:200]
                async with http.get(f"{sidecar.listen}/backend/hello") as response:
                    assert response.status == 200, "the sidecar keeps serving"
            after = await bad_request_counts(http, sidecar.admin)
        sidecar.signal(signal.SIGTERM)
        assert await sidecar.wait(10) == 0, sidecar.stderr.read_text()
    finally:
        await sidecar.kill()

    assert set(after) == set(BAD_REQUEST_REASONS), "every reason is exported from 0"
    assert {reason: after[reason] - before.get(reason, 0.0) for reason in BAD_REQUESTS} == {
        reason: 1.0 for reason in BAD_REQUESTS
    }
    lines = sidecar.json_lines()
    assert [line for line in lines if line["level"] in ("error", "critical")] == []
    output = "\n".join(sidecar.lines) + sidecar.stderr.read_text()
    assert "Traceback" not in output
    bad = sidecar.events("bad_request")
    assert [line["reason"] for line in bad] == list(BAD_REQUESTS)
    assert all(line["level"] in ("info", "debug") for line in bad)
    assert all("error" not in line for line in bad), "no traceback field"
    assert all(line["remote"] == "127.0.0.1" for line in bad)
