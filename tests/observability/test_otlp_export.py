"""The sidecar exports its spans over OTLP/HTTP, configured as an SRE would: `OTEL_*` only.

`checkout-sidecar run` runs as a real process with nothing but the standard
variables set; a small OTLP/HTTP receiver in the test (an aiohttp app on
`POST /v1/traces`) decodes each export with opentelemetry-proto, as a collector
would, and the test reads the spans back from it.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.conftest import StartServer
from tests.operations import SidecarProcess, until

PROTOBUF = "application/x-protobuf"
SERVICE = "checkout-sidecar-test"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@dataclass
class ExportedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    attributes: dict[str, Any]


@dataclass
class Receiver:
    """An OTLP/HTTP trace receiver: every span of every export, with its resource's name."""

    url: str = ""
    spans: list[ExportedSpan] = field(default_factory=list)
    content_types: set[str] = field(default_factory=set)

    async def export(self, request: web.Request) -> web.Response:
        self.content_types.add(request.content_type)
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ExportedSpan(
                            service=resource.get("service.name", ""),
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                        )
                    )
        reply = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type=PROTOBUF)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self.export)
        return app

    def of_kind(self, kind: int) -> list[ExportedSpan]:
        return [s for s in self.spans if s.kind == kind]


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


async def backend_handler(request: web.Request) -> web.Response:
    return web.json_response({"path": request.path})


@pytest.fixture
async def receiver(start_server: StartServer) -> Receiver:
    found = Receiver()
    server = await start_server(found.app())
    found.url = str(server.make_url("")).rstrip("/")
    return found


@pytest.fixture
async def backend_url(start_server: StartServer) -> str:
    app = web.Application()
    app.router.add_get("/{tail:.*}", backend_handler)
    server = await start_server(app)
    return str(server.make_url("")).rstrip("/")


def sre_environment(receiver: Receiver, **extra: str) -> dict[str, str]:
    """What an SRE sets: the endpoint (the SDK appends /v1/traces), a name, batching, sampling."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": SERVICE,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_TRACES_SAMPLER": "always_on",
        **extra,
    }


@pytest.fixture
async def start_process(tmp_path: Path) -> AsyncIterator[Any]:
    """Start `checkout-sidecar run` with exactly the given OTEL_* variables; killed at the end."""
    started: list[SidecarProcess] = []

    async def start(backend: str, otel: dict[str, str]) -> SidecarProcess:
        path = tmp_path / "sidecar.yaml"
        data = {
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0"},
            "store": f"sqlite://{tmp_path}/state.db",
            "upstreams": {"backend": {"url": backend}},
            "shutdown": {"drain_delay": "0s", "grace": "2s"},
        }
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        process = SidecarProcess(path)
        # only the variables this test means: none leaks in from the outer environment
        process.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
            **otel,
        }
        started.append(process)
        return await process.start()

    yield start
    for process in started:
        await process.kill()


async def get(url: str, headers: dict[str, str] | None = None) -> int:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url, headers=headers) as r:
        await r.read()
        return r.status


async def test_sidecar_exports_server_and_client_spans_to_the_otel_endpoint(
    receiver: Receiver, backend_url: str, start_process: Any
) -> None:
    sidecar = await start_process(backend_url, sre_environment(receiver))

    assert await get(f"{sidecar.listen}/backend/items", {"traceparent": TRACEPARENT}) == 200

    def server_and_client() -> bool:
        kinds = {s.kind for s in receiver.spans}
        return {Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT} <= kinds

    await until(server_and_client, seconds=10)
    assert receiver.content_types == {PROTOBUF}
    assert {s.service for s in receiver.spans} == {SERVICE}
    (server,) = receiver.of_kind(Span.SPAN_KIND_SERVER)
    (client,) = receiver.of_kind(Span.SPAN_KIND_CLIENT)
    assert server.name == "GET /{upstream}/{tail}"
    assert server.trace_id == client.trace_id == TRACE_ID
    assert client.attributes["sidecar.upstream"] == "backend"
    assert client.attributes["http.response.status_code"] == 200
    sidecar.signal()
    assert await sidecar.wait(15) == 0


async def test_spans_still_batched_are_flushed_when_the_sidecar_stops(
    receiver: Receiver, backend_url: str, start_process: Any
) -> None:
    # a batch delay far longer than the test: only the shutdown at exit can send them
    otel = sre_environment(receiver, OTEL_BSP_SCHEDULE_DELAY="600000")
    sidecar = await start_process(backend_url, otel)
    assert await get(f"{sidecar.listen}/backend/items") == 200

    sidecar.signal()
    assert await sidecar.wait(15) == 0

    assert {s.kind for s in receiver.spans} == {Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT}
