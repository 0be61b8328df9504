"""`checkout-sidecar` on the command line: validate, schema, and one real `run`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.cli import main
from tests.conftest import StartServer

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO / "config" / "sidecar.yaml"


def test_validate_of_the_shipped_config_prints_ok_and_exits_0(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith(
            ("SIDECAR_", "PAYMENT_", "INVENTORY_", "SHIPPING_", "COUPON_", "FRAUD_")
        ):
            monkeypatch.delenv(name)

    code = main(["validate", str(SHIPPED_CONFIG)])

    assert (code, capsys.readouterr().out) == (0, "ok\n")


def test_validate_prints_each_error_on_its_own_line_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text(
        "listne: 127.0.0.1:8080\n"
        "upstreams:\n"
        "  payment:\n"
        "    url: ftp://pay\n"
        "    timeout: {per_try: 5s, total: 1s}\n"
    )

    code = main(["validate", "bad.yaml"])

    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert [line.split(" ", 1)[0] for line in lines] == ["bad.yaml:1", "bad.yaml:4", "bad.yaml:5"]
    assert "ok" not in lines


def test_validate_of_a_missing_file_says_it_cannot_be_read_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    code = main(["validate", "missing.yaml"])

    assert code == 1
    assert capsys.readouterr().out == "missing.yaml cannot read: No such file or directory\n"


def test_schema_prints_the_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["schema"])

    schema = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {"listen", "admin", "defaults", "upstreams"} <= set(schema["properties"])


def test_run_with_an_invalid_config_exits_1_before_binding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("listen: nowhere\n")

    code = main(["run", "--config", str(path)])

    assert code == 1
    assert f"{path}:1 listen:" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# one real process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_run_proxies_requests_and_exits_0_on_sigterm(
    tmp_path: Path, start_server: StartServer
) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "query": request.query_string})

    upstream_app = web.Application()
    upstream_app.router.add_get("/hello", hello)
    upstream = await start_server(upstream_app)
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f"listen: 127.0.0.1:{free_port()}\n"
        "admin:\n"
        f"  listen: 127.0.0.1:{free_port()}\n"
        f"store: sqlite://{tmp_path}/state.db\n"
        "shutdown: {drain_delay: 100ms, grace: 2s}\n"
        "upstreams:\n"
        "  backend:\n"
        f"    url: http://127.0.0.1:{upstream.port}\n"
    )
    stderr = tmp_path / "stderr.log"

    with stderr.open("wb") as stderr_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "run",
            "--config",
            str(config),
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr_file,
        )
    try:
        base = await asyncio.wait_for(_listen_url(process), timeout=15)

        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{base}/backend/hello?x=1") as response,
        ):
            assert response.status == 200
            assert await response.json() == {"path": "/hello", "query": "x=1"}

        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), timeout=5)
        assert code == 0, stderr.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _listen_url(process: asyncio.subprocess.Process) -> str:
    """The sidecar's base URL from its JSON `start` log line (stdout is JSON lines only)."""
    assert process.stdout is not None
    while line := (await process.stdout.readline()).decode():
        entry = json.loads(line)
        if entry.get("event") == "start":
            return str(entry["listen"])
    raise AssertionError(f"the sidecar exited ({await process.wait()}) before listening")
