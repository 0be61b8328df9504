"""The logs an SRE ships: JSON lines on stdout, one per event, quiet on the hot path."""

from __future__ import annotations

import io
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import TracerProvider

from proxy.app import Sidecar
from proxy.cli import print_banner
from proxy.config.loader import load_config
from proxy.observability import tracing
from proxy.observability.logging import JsonFormatter, setup_logging
from proxy.observability.tracing import Tracing
from tests.conftest import StartServer
from tests.operations import SidecarProcess

REQUESTS = 5


@pytest.fixture
async def backend(start_server: StartServer) -> TestServer:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": True})

    app = web.Application()
    app.router.add_get("/hello", hello)
    return await start_server(app)


def config_data(backend: TestServer, tmp_path: Path, **log: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "store": f"sqlite://{tmp_path}/state.db",
        "shutdown": {"drain_delay": "50ms", "grace": "2s"},
        "reload": {"watch": False},
        "upstreams": {"backend": {"url": f"http://127.0.0.1:{backend.port}"}},
    }
    if log:
        data["log"] = log
    return data


def break_config(path: Path) -> None:
    """Make the file invalid: a duration that is not one."""
    text = path.read_text()
    assert "drain_delay: 50ms" in text
    path.write_text(text.replace("drain_delay: 50ms", "drain_delay: soon"))


async def run_sidecar(
    path: Path,
    *,
    env: dict[str, str] | None = None,
    bad_reload: bool = False,
) -> SidecarProcess:
    """Start, send REQUESTS requests, optionally SIGHUP a broken file, stop; the process."""
    sidecar = await SidecarProcess(path, env=env).start()
    try:
        async with aiohttp.ClientSession() as http:
            for number in range(REQUESTS):
                async with http.get(f"{sidecar.listen}/backend/hello?n={number}") as response:
                    assert response.status == 200
        if bad_reload:
            break_config(path)
            sidecar.signal(signal.SIGHUP)
            await sidecar.wait_for_event("config_refused")
        sidecar.signal(signal.SIGTERM)
        assert await sidecar.wait(10) == 0, sidecar.stderr.read_text()
    finally:
        await sidecar.kill()
    return sidecar


async def test_every_line_is_json_with_the_start_and_shutdown_events(
    backend: TestServer, tmp_path: Path
) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config_data(backend, tmp_path)))

    sidecar = await run_sidecar(path)

    lines = sidecar.json_lines()  # every line, the first included: no plain-text banner
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines), lines
    assert all(line["ts"].endswith("Z") for line in lines)
    (start,) = sidecar.events("start")
    assert (start["level"], start["listen"], start["admin"]) == (
        "info",
        sidecar.listen,
        sidecar.admin,
    )
    assert [e["event"] for e in lines if e.get("event", "").startswith("shutdown")] == [
        "shutdown",
        "shutdown_complete",
    ]


def not_json(lines: list[str]) -> list[str]:
    bad = []
    for line in lines:
        try:
            parsed = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not isinstance(parsed, dict):
            bad.append(line)
    return bad


async def test_stdout_to_a_pipe_is_json_lines_only(backend: TestServer, tmp_path: Path) -> None:
    """What a log shipper reads: no human banner on a pipe, the addresses in `start`."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config_data(backend, tmp_path)))

    sidecar = await run_sidecar(path)

    assert sidecar.lines
    assert not_json(sidecar.lines) == []
    (start,) = sidecar.events("start")
    assert start["listen"].startswith("http://127.0.0.1:")
    assert start["admin"].startswith("http://127.0.0.1:")


async def test_the_worker_stdout_to_a_pipe_is_json_lines_only(
    backend: TestServer, tmp_path: Path
) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config_data(backend, tmp_path)))
    worker = await SidecarProcess(path, command="worker").launch()
    try:
        await worker.wait_for_event("worker_start", timeout=15)
        worker.signal(signal.SIGTERM)
        assert await worker.wait(10) == 0, worker.stderr.read_text()
    finally:
        await worker.kill()

    assert not_json(worker.lines) == []
    (start,) = worker.events("worker_start")
    assert start["queue"].startswith("sqlite://")


def test_the_banner_is_printed_only_to_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    printed = io.StringIO()
    addresses = {"listen": "http://127.0.0.1:1", "admin": "http://127.0.0.1:2"}

    monkeypatch.setattr(sys, "stdout", printed)
    print_banner(addresses)
    assert printed.getvalue() == ""

    monkeypatch.setattr(printed, "isatty", lambda: True)
    print_banner(addresses)
    assert printed.getvalue().splitlines() == [
        "checkout-sidecar listen on http://127.0.0.1:1",
        "checkout-sidecar admin on http://127.0.0.1:2",
    ]


async def test_no_line_per_proxied_request_by_default(backend: TestServer, tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config_data(backend, tmp_path)))

    sidecar = await run_sidecar(path)

    assert [line for line in sidecar.lines if "/backend/hello" in line] == []
    assert [line for line in sidecar.json_lines() if "access" in line["logger"]] == []


async def test_the_access_log_writes_one_line_per_proxied_request(
    backend: TestServer, tmp_path: Path
) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config_data(backend, tmp_path, access_log=True)))

    sidecar = await run_sidecar(path)

    access = [line for line in sidecar.json_lines() if line["logger"] == "proxy.access"]
    assert [line["first_request_line"] for line in access] == [
        f"GET /backend/hello?n={number} HTTP/1.1" for number in range(REQUESTS)
    ]
    assert all(line["response_status"] == 200 for line in access)


async def test_a_refused_reload_is_logged_with_its_errors(
    backend: TestServer, tmp_path: Path
) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config_data(backend, tmp_path)))

    sidecar = await run_sidecar(path, bad_reload=True)

    (refused,) = sidecar.events("config_refused")
    assert refused["level"] == "error"
    assert len(refused["errors"]) == 1
    assert refused["errors"][0].startswith(f"{path}:")
    assert "shutdown.drain_delay" in refused["errors"][0]
    assert sidecar.events("config_loaded") == []


async def test_log_level_from_the_environment_wins_over_the_config(
    backend: TestServer, tmp_path: Path
) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config_data(backend, tmp_path, level="info")))

    sidecar = await run_sidecar(path, env={"LOG_LEVEL": "warning"}, bad_reload=True)

    (start,) = sidecar.events("start")  # at every level: it carries the addresses
    assert start["level"] == "info"
    levels = {line["level"] for line in sidecar.json_lines() if line.get("event") != "start"}
    assert "info" not in levels
    assert len(sidecar.events("config_refused")) == 1, "errors still get through"


async def test_log_level_from_the_config(backend: TestServer, tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config_data(backend, tmp_path, level="error")))

    sidecar = await run_sidecar(path, bad_reload=True)

    lines = [line for line in sidecar.json_lines() if line.get("event") != "start"]
    assert {line["level"] for line in lines} == {"error"}
    assert len(sidecar.events("config_refused")) == 1


# ---------------------------------------------------------------------------
# in this process


def formatted(record: logging.LogRecord) -> dict[str, Any]:
    return json.loads(JsonFormatter().format(record))  # type: ignore[no-any-return]


def test_a_line_carries_the_trace_and_span_of_the_current_span() -> None:
    provider = TracerProvider()
    tracer = provider.get_tracer("test")
    record = logging.LogRecord("proxy", logging.INFO, __file__, 1, "in a span", (), None)

    tracing.configure(Tracing(provider))  # spans are only made with tracing on
    try:
        with tracer.start_as_current_span("checkout") as span:
            line = formatted(record)
    finally:
        tracing.configure(tracing.OFF)
    context = span.get_span_context()

    assert line["trace_id"] == f"{context.trace_id:032x}"
    assert line["span_id"] == f"{context.span_id:016x}"
    assert "trace_id" not in formatted(record), "no span, no ids"


@pytest.mark.parametrize("passed_as", ["trace headers", "request headers"])
def test_a_request_that_makes_no_span_logs_its_callers_trace(passed_as: str) -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    # the checkout keeps a dict of the trace headers; a proxied request its own headers
    passed: Any = {"traceparent": traceparent}
    if passed_as == "request headers":
        passed = CIMultiDictProxy(CIMultiDict({"Host": "x", "Traceparent": traceparent}))
    record = logging.LogRecord("proxy", logging.INFO, __file__, 1, "retrying", (), None)
    provider = TracerProvider()
    tracing.configure(Tracing(provider))
    token = tracing.PASSED.set(passed)
    try:
        line = formatted(record)
    finally:
        tracing.PASSED.reset(token)
        tracing.configure(tracing.OFF)
        provider.shutdown()
    assert (line["trace_id"], line["span_id"]) == (traceparent[3:35], traceparent[36:52])


def test_with_tracing_off_a_line_asks_nothing_of_opentelemetry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from proxy.observability import logging as sidecar_logging

    def no_call() -> None:
        raise AssertionError("OpenTelemetry asked for the current span with tracing off")

    assert not tracing.TRACING.active
    monkeypatch.setattr(sidecar_logging._otel_trace, "get_current_span", no_call)
    record = logging.LogRecord("proxy", logging.INFO, __file__, 1, "tracing off", (), None)
    assert "trace_id" not in formatted(record)


def test_extra_fields_become_keys_of_the_line() -> None:
    record = logging.LogRecord("proxy.reload", logging.ERROR, __file__, 1, "refused", (), None)
    record.event = "config_refused"
    record.errors = ["sidecar.yaml:3 listen: bad"]

    line = formatted(record)

    assert line["event"] == "config_refused"
    assert line["errors"] == ["sidecar.yaml:3 listen: bad"]
    assert (line["level"], line["logger"], line["msg"]) == ("error", "proxy.reload", "refused")


def test_setup_logging_takes_log_level_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        monkeypatch.setenv("LOG_LEVEL", "warning")
        setup_logging("debug")
        assert root.level == logging.WARNING
        monkeypatch.delenv("LOG_LEVEL")
        setup_logging("error")
        assert root.level == logging.ERROR
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


async def test_a_breaker_transition_is_logged(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump({"upstreams": {"dead": {"url": "http://127.0.0.1:9"}}}))
    sidecar = Sidecar(load_config(path))
    breaker = sidecar.runtime.upstreams.get("dead").policies.breaker  # type: ignore[union-attr]
    assert breaker is not None

    with caplog.at_level(logging.INFO):
        breaker.force_open()

    assert [r for r in caplog.records if getattr(r, "event", None) == "breaker_transition"]
