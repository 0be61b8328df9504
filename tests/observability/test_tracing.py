"""Traces, read from the SDK's in-memory exporter: the span tree, W3C propagation, job links.

Each test that wants spans takes the `spans` fixture, which installs an SDK
TracerProvider with an in-memory exporter as the process's tracing *before* any
sidecar app is built (`traced()` wraps the handlers at build time, and only
when tracing is on) and puts `tracing.OFF` back afterwards, so no other test in
the run ever sees tracing on. A checkout queues jobs (fraud screening, the
confirmation e-mail) whose spans may finish while a test reads the exporter;
they are in traces of their own, so a test reads a request's spans as the tree
under its SERVER span.

Where the retry event lands: the pipeline schedules a retry after the failed
attempt's CLIENT span has ended, so the `retry` event is on the span that
encloses the call, the step's INTERNAL span in a checkout (the SERVER span on a
plain proxied route).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from proxy.app import Sidecar
from proxy.jobs.handlers import upstream_call_job
from proxy.observability import tracing
from proxy.observability.tracing import Tracing
from proxy.simulator import start_simulator
from proxy.storage.open import open_queue
from tests.checkout.conftest import (
    ORDER,
    Rig,
    eventually,
    new_key,
    sidecar_config,
    simulator_config,
)
from tests.conftest import StartServer

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
CHECKOUT_STEPS = ("inventory", "payment", "shipping", "coupon")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory, for one test; off again (the default) afterwards."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(Tracing(provider))
    try:
        yield exporter
    finally:
        tracing.configure(tracing.OFF)
        provider.shutdown()


@pytest.fixture
async def traced_rig(
    spans: InMemorySpanExporter, start_sidecar: Any, tmp_path: Path
) -> AsyncIterator[Rig]:
    """The shipped checkout in front of the simulator, built with tracing on."""
    async with await start_simulator(simulator_config()) as sim:
        store = f"sqlite://{tmp_path}/sidecar-{uuid.uuid4().hex[:8]}.db"
        sidecar, url = await start_sidecar(sidecar_config(sim, store))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            yield Rig(sim, sidecar, url, http)


async def post_checkout(rig: Rig, headers: dict[str, str] | None = None) -> dict[str, Any]:
    sent = {"Idempotency-Key": new_key(), **(headers or {})}
    async with rig.http.post(f"{rig.url}/checkout", json=ORDER, headers=sent) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return body  # type: ignore[no-any-return]


def handlers(sidecar: Sidecar) -> dict[str, Any]:
    """Each data-plane route's handler by its path template: wrapped by traced(), or the
    route's own."""
    plane = sidecar.data_plane()
    return {
        "/{upstream}/{tail}": plane.proxy,
        "/checkout": plane.checkout_post,
        "/checkout/{id}": plane.checkout_get,
    }


def unwrapped(handler: Any) -> bool:
    """The route's own method, with nothing of tracing around it."""
    return getattr(handler, "__self__", None) is not None


def trace_hex(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def span_hex(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


def parent_hex(span: ReadableSpan) -> str | None:
    return None if span.parent is None else f"{span.parent.span_id:016x}"


def only(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def children(spans: list[ReadableSpan], parent: ReadableSpan, kind: SpanKind) -> list[ReadableSpan]:
    mine = [s for s in spans if parent_hex(s) == span_hex(parent) and s.kind == kind]
    return sorted(mine, key=lambda s: s.start_time or 0)


def descendants(spans: list[ReadableSpan], root: ReadableSpan) -> list[ReadableSpan]:
    """Every span below `root`, found by parent ids (queued jobs, in traces of their own, not)."""
    found: list[ReadableSpan] = []
    frontier = {span_hex(root)}
    while frontier:
        below = [s for s in spans if parent_hex(s) in frontier]
        found += below
        frontier = {span_hex(s) for s in below}
    return found


# -- a checkout's span tree ------------------------------------------------------------------


async def test_checkout_with_a_retry_and_a_fallback_has_the_full_span_tree(
    traced_rig: Rig, spans: InMemorySpanExporter
) -> None:
    rig = traced_rig
    rig.sim.set_faults("inventory", {"fail_next": {"count": 1, "status": 502}})
    rig.sim.set_faults("shipping", {"error_rate": 1.0})

    body = await post_checkout(rig, {"traceparent": TRACEPARENT})

    assert body["status"] == "confirmed" and body["degraded"] == ["shipping"]
    finished = list(spans.get_finished_spans())
    server = only(finished, "POST /checkout")
    assert server.kind == SpanKind.SERVER
    assert trace_hex(server) == TRACE_ID and parent_hex(server) == PARENT_ID
    assert server.attributes["http.response.status_code"] == 200
    tree = descendants(finished, server)
    assert len(tree) >= 1 + len(CHECKOUT_STEPS) + 5 + 2  # checkout, steps, attempts, commits
    assert all(trace_hex(s) == TRACE_ID for s in tree), "one trace for the whole checkout"

    checkout = only(finished, "checkout")
    assert checkout.kind == SpanKind.INTERNAL and parent_hex(checkout) == span_hex(server)
    assert checkout.attributes["sidecar.checkout.id"] == body["checkout_id"]
    assert checkout.attributes["sidecar.checkout.decision"] == "confirmed"
    assert checkout.attributes["sidecar.checkout.result"] == "confirmed"
    # shipping and coupon are read-only, started before the claim: under "checkout" too
    step_spans = {s.name: s for s in children(finished, checkout, SpanKind.INTERNAL)}
    assert sorted(step_spans) == sorted(f"step {name}" for name in CHECKOUT_STEPS)

    for name in CHECKOUT_STEPS:
        step = step_spans[f"step {name}"]
        for attempt in children(finished, step, SpanKind.CLIENT):
            assert attempt.attributes["sidecar.upstream"] == name
            assert attempt.attributes["sidecar.breaker.state"] == "closed"
            assert "sidecar.outcome" in attempt.attributes
            assert "http.response.status_code" in attempt.attributes

    inventory = step_spans["step inventory"]
    first, second = children(finished, inventory, SpanKind.CLIENT)
    assert first.attributes["http.response.status_code"] == 502
    assert first.status.status_code == StatusCode.ERROR
    assert "http.request.resend_count" not in first.attributes  # semconv: absent on the first
    assert second.attributes["http.response.status_code"] == 201
    assert second.attributes["http.request.resend_count"] == 1
    assert second.attributes["sidecar.outcome"] == "ok"
    retries = [e for e in inventory.events if e.name == "retry"]
    assert len(retries) == 1
    assert retries[0].attributes["sidecar.retry.reason"] == "status_502"
    assert first.attributes["sidecar.outcome"] == "upstream_5xx"
    assert inventory.attributes["sidecar.step.attempts"] == 2

    shipping = step_spans["step shipping"]
    assert shipping.attributes["sidecar.step.status"] == "fallback"
    assert shipping.attributes["sidecar.fallback.reason"] == "upstream_5xx"
    assert shipping.attributes["sidecar.fallback.source"] == "static"
    failed = children(finished, shipping, SpanKind.CLIENT)  # 503s, retried until the fallback
    assert len(failed) == shipping.attributes["sidecar.step.attempts"] > 1
    assert [a.attributes["http.response.status_code"] for a in failed] == [503] * len(failed)
    assert all(a.attributes["sidecar.outcome"] == "upstream_5xx" for a in failed)
    assert [a.attributes.get("http.request.resend_count", 0) for a in failed] == list(
        range(len(failed))
    )
    for name in ("payment", "coupon"):
        (attempt,) = children(finished, step_spans[f"step {name}"], SpanKind.CLIENT)
        assert attempt.attributes["sidecar.outcome"] == "ok"

    # the commit calls (inventory commit, payment capture) run after the fan-out: in the
    # checkout's span, not in a step's
    commits = [
        s
        for s in children(finished, checkout, SpanKind.CLIENT)
        if s.attributes["url.full"].endswith(("/commit", "/capture"))
    ]
    assert sorted(s.attributes["sidecar.upstream"] for s in commits) == ["inventory", "payment"]
    assert all(s.attributes["sidecar.outcome"] == "ok" for s in commits)


async def test_checkout_without_traceparent_starts_a_new_sampled_trace(
    traced_rig: Rig, spans: InMemorySpanExporter
) -> None:
    await post_checkout(traced_rig)

    finished = list(spans.get_finished_spans())
    server = only(finished, "POST /checkout")
    assert server.parent is None and server.context.trace_flags.sampled
    tree = descendants(finished, server)
    assert {s.name for s in tree} >= {"checkout", *(f"step {n}" for n in CHECKOUT_STEPS)}
    assert {trace_hex(s) for s in tree} == {trace_hex(server)}


# -- W3C propagation to the upstream ------------------------------------------------------------


class RecordingUpstream:
    """Answers 502 to the first `fail_first` requests, then 200; keeps every request's headers."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.headers: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        if len(self.headers) <= self.fail_first:
            return web.json_response({"error": "bad gateway"}, status=502)
        return web.json_response({"ok": True})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


def proxy_config(upstream_url: str) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "upstreams": {
            "echo": {
                "url": upstream_url,
                "retry": {"backoff": {"base": "1ms", "max": "5ms"}},
            }
        },
    }


async def test_upstream_gets_traceparent_of_each_attempt_and_the_callers_tracestate_and_baggage(
    spans: InMemorySpanExporter, start_server: StartServer, start_sidecar: Any
) -> None:
    upstream = RecordingUpstream(fail_first=1)
    server = await start_server(upstream.app())
    _, url = await start_sidecar(proxy_config(str(server.make_url("")).rstrip("/")))
    sent = {
        "traceparent": TRACEPARENT,
        "tracestate": "vendor=abc,other=1",
        "baggage": "tenant=acme",
    }

    async with aiohttp.ClientSession() as http, http.get(f"{url}/echo/items", headers=sent) as resp:
        assert resp.status == 200, await resp.text()

    finished = list(spans.get_finished_spans())
    server_span = only(finished, "GET /{upstream}/{tail}")
    assert trace_hex(server_span) == TRACE_ID and parent_hex(server_span) == PARENT_ID
    assert server_span.attributes["sidecar.upstream"] == "echo"
    attempts = children(finished, server_span, SpanKind.CLIENT)
    assert [a.attributes.get("http.request.resend_count") for a in attempts] == [None, 1]
    assert [e.name for e in server_span.events] == ["retry"]
    assert len(upstream.headers) == 2
    for attempt, received in zip(attempts, upstream.headers, strict=True):
        version, trace_id, parent_id, flags = received["traceparent"].split("-")
        assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
        assert parent_id == span_hex(attempt)
        assert received["tracestate"] == "vendor=abc,other=1"
        assert "tenant=acme" in received["baggage"]


async def test_with_tracing_off_no_wrapper_no_spans_and_traceparent_passes_through(
    start_server: StartServer, start_sidecar: Any
) -> None:
    assert not tracing.TRACING.enabled  # the default: no OTEL_* endpoint, no configure()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # never installed: nothing may reach it
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    upstream = RecordingUpstream()
    server = await start_server(upstream.app())
    sidecar, url = await start_sidecar(proxy_config(str(server.make_url("")).rstrip("/")))

    assert all(unwrapped(handler) for handler in handlers(sidecar).values())
    async with aiohttp.ClientSession() as http:
        headers = {"traceparent": TRACEPARENT}
        async with http.get(f"{url}/echo/items", headers=headers) as resp:
            assert resp.status == 200

    # the caller's traceparent is forwarded as any header: no span of ours was made
    assert upstream.headers[0]["traceparent"] == TRACEPARENT
    assert exporter.get_finished_spans() == ()
    provider.shutdown()


# -- queued jobs: a new trace, linked to the checkout's -------------------------------------------


async def test_queued_on_fallback_job_has_a_consumer_span_linked_to_the_checkout(
    traced_rig: Rig, spans: InMemorySpanExporter
) -> None:
    rig = traced_rig
    rig.sim.set_faults("coupon", {"error_rate": 1.0})

    body = await post_checkout(rig, {"traceparent": TRACEPARENT})
    assert body["degraded"] == ["coupon"]
    rig.sim.set_faults("coupon", {})

    def followups() -> list[ReadableSpan]:
        return [
            s
            for s in spans.get_finished_spans()
            if s.name == "job checkout_followup"
            and s.attributes["sidecar.job.id"] == f"{body['checkout_id']}:coupon:on_fallback"
        ]

    def succeeded() -> list[ReadableSpan]:
        # the follow-up waits (retries) until the checkout is final, one span per run
        return [s for s in followups() if s.status.status_code != StatusCode.ERROR]

    async def ran() -> bool:
        return bool(succeeded())

    await eventually(ran)
    (job,) = succeeded()
    assert job.kind == SpanKind.CONSUMER
    assert job.parent is None and trace_hex(job) != TRACE_ID
    assert job.attributes["sidecar.job.id"] == f"{body['checkout_id']}:coupon:on_fallback"
    assert [f"{link.context.trace_id:032x}" for link in job.links] == [TRACE_ID]
    # the job's own calls are in the job's trace
    calls = [s for s in spans.get_finished_spans() if parent_hex(s) == span_hex(job)]
    assert calls and all(trace_hex(s) == trace_hex(job) for s in calls)


async def test_job_left_by_an_earlier_process_is_linked_to_the_trace_stored_with_it(
    spans: InMemorySpanExporter, start_server: StartServer, start_sidecar: Any, tmp_path: Path
) -> None:
    upstream = RecordingUpstream()
    server = await start_server(upstream.app())
    store = f"sqlite://{tmp_path}/restart.db"
    # an earlier sidecar queued the call with its checkout's trace context, then stopped
    queue = await open_queue(store)
    job = upstream_call_job(
        "earlier-call", "echo", "POST", "/refunds", trace={"traceparent": TRACEPARENT}
    )
    await queue.enqueue(job)
    await queue.close()

    data = {
        **proxy_config(str(server.make_url("")).rstrip("/")),
        "store": store,
        "queue": {"poll_interval": "20ms"},
    }
    await start_sidecar(data)

    def job_spans() -> list[ReadableSpan]:
        return [s for s in spans.get_finished_spans() if s.name == "job upstream_call"]

    async def ran() -> bool:
        return bool(job_spans())

    await eventually(ran)
    (span,) = job_spans()
    assert span.kind == SpanKind.CONSUMER and trace_hex(span) != TRACE_ID
    (link,) = span.links
    assert f"{link.context.trace_id:032x}" == TRACE_ID
    assert f"{link.context.span_id:016x}" == PARENT_ID
    # and the upstream call it makes continues the job's trace, not the stored one
    assert upstream.headers[0]["traceparent"].split("-")[1] == trace_hex(span)


# -- exemplars ------------------------------------------------------------------------------------


async def test_openmetrics_scrape_has_the_trace_id_as_exemplar_on_request_latency(
    spans: InMemorySpanExporter, start_server: StartServer, start_sidecar: Any
) -> None:
    upstream = RecordingUpstream()
    server = await start_server(upstream.app())
    sidecar, url = await start_sidecar(proxy_config(str(server.make_url("")).rstrip("/")))
    admin = await start_server(sidecar.build_admin_app())

    async with aiohttp.ClientSession() as http:
        headers = {"traceparent": TRACEPARENT}
        async with http.get(f"{url}/echo/items", headers=headers) as resp:
            assert resp.status == 200
        accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
        async with http.get(admin.make_url("/metrics"), headers=accept) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            text = await resp.text()
        async with http.get(admin.make_url("/metrics")) as resp:
            plain = await resp.text()

    pattern = re.compile(
        r'^sidecar_request_duration_seconds_bucket\{[^}]*upstream="echo"[^}]*\} \S+ '
        r'# \{trace_id="([0-9a-f]{32})"\}',
        re.MULTILINE,
    )
    assert pattern.findall(text) == [TRACE_ID]
    assert "trace_id=" not in plain  # the classic text format has no exemplars


# -- a sampler that records nothing: no span, the caller's trace still reaches the upstreams ------

UNSAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-00"


@pytest.mark.parametrize(
    ("sampler", "argument", "propagate_only", "door"),
    [
        ("always_off", None, True, None),
        ("traceidratio", "0", True, None),
        ("parentbased_traceidratio", "0", False, (True, False, True)),
        ("parentbased_always_off", None, False, (True, False, True)),
        ("parentbased_always_on", None, False, (False, False, True)),
        ("always_on", None, False, None),
        ("traceidratio", "0.5", False, None),
    ],
)
def test_the_sampler_decides_at_configure_time_whether_any_span_can_be_recorded(
    monkeypatch: pytest.MonkeyPatch,
    sampler: str,
    argument: str | None,
    propagate_only: bool,
    door: tuple[bool, bool, bool] | None,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    if argument is None:
        monkeypatch.delenv("OTEL_TRACES_SAMPLER_ARG", raising=False)
    else:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", argument)
    found = tracing.from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    try:
        assert found.propagate_only is propagate_only
        assert found.enabled is not propagate_only and found.active
        assert (found.provider is None) is propagate_only  # no exporter thread either
        if door is None:
            assert found.door is None
        else:
            assert found.door is not None
            assert (found.door.root_off, found.door.sampled_off, found.door.unsampled_off) == door
    finally:
        found.shutdown()


@pytest.mark.parametrize(
    ("traceparent", "dropped"),
    [
        (UNSAMPLED, True),
        (TRACEPARENT, False),
        (None, False),
        ("00-" + "0" * 32 + f"-{PARENT_ID}-00", False),  # an invalid parent: the root decides
        (f"00-{TRACE_ID}-{PARENT_ID}-00-extra", False),  # version 00 has no more fields
        (f"01-{TRACE_ID}-{PARENT_ID}-00-future", True),  # a later version may add fields
    ],
)
def test_the_door_reads_the_sampled_flag_as_the_sdk_does(
    traceparent: str | None, dropped: bool
) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    door = Tracing(TracerProvider(sampler=ParentBased(ALWAYS_ON)))
    headers = {} if traceparent is None else {"traceparent": traceparent}
    assert door.drops(headers) is dropped


@pytest.mark.parametrize(
    "traceparent",
    [
        UNSAMPLED,
        TRACEPARENT,
        f"00-{TRACE_ID}-{PARENT_ID}-02",  # another flag, not sampled
        f"00-{TRACE_ID}-{PARENT_ID}-03",
        f"00-{TRACE_ID}-{PARENT_ID}-0f",
        f"00-{TRACE_ID}-{PARENT_ID}-fe",
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-00",  # upper case: not a traceparent
        f"00-{TRACE_ID}-{PARENT_ID}-0G",
        f"ff-{TRACE_ID}-{PARENT_ID}-00",  # the invalid version
        f"cc-{TRACE_ID}-{PARENT_ID}-00",  # a later version, same shape
        f"00-{TRACE_ID}-{'0' * 16}-00",
        f"00-{'0' * 32}-{PARENT_ID}-00",
        f" 00-{TRACE_ID}-{PARENT_ID}-00",  # spaces around: the SDK still reads it
        f"00-{TRACE_ID}-{PARENT_ID}-00\t",
        f"00-{TRACE_ID}-{PARENT_ID}-00-",
        f"01-{TRACE_ID}-{PARENT_ID}-00-" + "x" * 600,  # longer than the SDK reads
        f"00-{TRACE_ID}-{PARENT_ID}-0",
        f"00-{TRACE_ID}-{PARENT_ID}x00",
        f"00_{TRACE_ID}-{PARENT_ID}-00",
        "",
        "garbage",
    ],
)
@pytest.mark.parametrize("sampler", ["parentbased_always_on", "parentbased_always_off"])
def test_the_door_decides_as_the_sdk_would_for_any_traceparent(
    traceparent: str, sampler: str
) -> None:
    """The door's answer is the SDK's own: extract(), then the parent-based sampler."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent_based = ParentBased(ALWAYS_ON if sampler == "parentbased_always_on" else ALWAYS_OFF)
    door = Tracing(TracerProvider(sampler=parent_based))
    assert door.door is not None
    context = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    result = parent_based.should_sample(context, int(TRACE_ID, 16), "GET /{upstream}")
    assert door.drops({"traceparent": traceparent}) is not result.decision.is_sampled()


@pytest.fixture
def simulator_headers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, str]]]:
    """(path, headers) of every API request the simulator receives (its /_ routes left out)."""
    from proxy.simulator import server as simulator_server

    seen: list[tuple[str, dict[str, str]]] = []
    build = simulator_server.build_app

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/_"):
            seen.append((request.path, dict(request.headers)))
        return await handler(request)  # type: ignore[no-any-return]

    def recording_app(name: str, state: Any) -> web.Application:
        app = build(name, state)
        app.middlewares.insert(0, record)
        return app

    monkeypatch.setattr(simulator_server, "build_app", recording_app)
    return seen


def always_off_from_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tracing as `OTEL_TRACES_SAMPLER=always_off` and an endpoint make it."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    configured = tracing.from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    assert configured.propagate_only and configured.provider is None
    tracing.configure(configured)
    try:
        yield
    finally:
        tracing.configure(tracing.OFF)


@pytest.fixture
def always_off(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    yield from always_off_from_environment(monkeypatch)


@pytest.fixture
def parent_based(spans: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    """The SDK's default sampler (parentbased_always_on), spans into memory."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    provider = TracerProvider(sampler=ParentBased(ALWAYS_ON))
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.configure(Tracing(provider))
    try:
        yield spans
    finally:
        tracing.configure(tracing.OFF)
        provider.shutdown()


@pytest.mark.parametrize("mode", ["always_off", "unsampled_parent"])
async def test_a_checkout_that_records_no_span_passes_the_callers_trace_to_every_upstream_call(
    request: pytest.FixtureRequest,
    simulator_headers: list[tuple[str, dict[str, str]]],
    start_sidecar: Any,
    tmp_path: Path,
    mode: str,
) -> None:
    exporter: InMemorySpanExporter | None = None
    if mode == "always_off":
        request.getfixturevalue("always_off")
        traceparent = TRACEPARENT  # sampled by the caller: always_off records nothing anyway
    else:
        exporter = request.getfixturevalue("parent_based")
        traceparent = UNSAMPLED
    sent = {"traceparent": traceparent, "tracestate": "vendor=abc", "baggage": "tenant=acme"}
    async with await start_simulator(simulator_config()) as sim:
        store = f"sqlite://{tmp_path}/sidecar.db"
        sidecar, url = await start_sidecar(sidecar_config(sim, store))
        found = handlers(sidecar)
        # propagation only: the proxied route runs as it is, the checkout passes the trace on
        assert unwrapped(found["/{upstream}/{tail}"]) is (mode == "always_off")
        assert not unwrapped(found["/checkout"])
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            body = await post_checkout(Rig(sim, sidecar, url, http), sent)
    assert body["status"] == "confirmed"

    # the fan-out, the commits and the capture all carry the caller's context, as it came;
    # the fraud screening is a queued job, a trace of its own (linked to the caller's)
    calls = [(path, headers) for path, headers in simulator_headers if path != "/score"]
    paths = [path for path, _ in calls]
    assert any("/commit" in p for p in paths) and any("/capture" in p for p in paths), paths
    assert len(calls) >= len(CHECKOUT_STEPS) + 2
    for path, headers in calls:
        assert headers.get("traceparent") == traceparent, path
        assert headers.get("tracestate") == "vendor=abc", path
        assert headers.get("baggage") == "tenant=acme", path
    if exporter is not None:
        assert [s.name for s in exporter.get_finished_spans() if trace_hex(s) == TRACE_ID] == []


async def test_unsampled_parent_on_a_proxied_request_makes_no_span_and_goes_on_unchanged(
    parent_based: InMemorySpanExporter, start_server: StartServer, start_sidecar: Any
) -> None:
    upstream = RecordingUpstream()
    server = await start_server(upstream.app())
    _, url = await start_sidecar(proxy_config(str(server.make_url("")).rstrip("/")))

    async with aiohttp.ClientSession() as http:
        for traceparent in (UNSAMPLED, TRACEPARENT):
            async with http.get(f"{url}/echo/items", headers={"traceparent": traceparent}) as r:
                assert r.status == 200

    assert upstream.headers[0]["traceparent"] == UNSAMPLED
    # the sampled one still gets the full treatment: a SERVER and a CLIENT span
    finished = list(parent_based.get_finished_spans())
    assert sorted(s.kind.name for s in finished) == ["CLIENT", "SERVER"]
    assert {trace_hex(s) for s in finished} == {TRACE_ID}
    assert upstream.headers[1]["traceparent"].split("-")[3] == "01"


@pytest.fixture
def sdk_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the OpenTelemetry calls made while the test runs, in order."""
    from opentelemetry import propagate, trace

    calls: list[str] = []

    def counted(module: Any, name: str) -> None:
        real = getattr(module, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, call)

    for module, name in [
        (propagate, "extract"),
        (propagate, "inject"),
        (trace, "get_current_span"),
        (tracing.otel_context, "attach"),
    ]:
        counted(module, name)
    return calls


async def test_with_tracing_off_a_request_makes_no_opentelemetry_call(
    sdk_calls: list[str], start_server: StartServer, start_sidecar: Any
) -> None:
    assert not tracing.TRACING.active
    upstream = RecordingUpstream()
    server = await start_server(upstream.app())
    _, url = await start_sidecar(proxy_config(str(server.make_url("")).rstrip("/")))
    async with aiohttp.ClientSession() as http:
        for headers in ({"traceparent": UNSAMPLED}, {"traceparent": TRACEPARENT}, {}):
            async with http.get(f"{url}/echo/items", headers=headers) as resp:
                assert resp.status == 200
    assert sdk_calls == []
    assert upstream.headers[1]["traceparent"] == TRACEPARENT


async def test_an_unsampled_parent_is_sorted_at_the_door_without_calling_the_sdk(
    parent_based: InMemorySpanExporter,
    start_server: StartServer,
    start_sidecar: Any,
    sdk_calls: list[str],
) -> None:
    calls = sdk_calls
    upstream = RecordingUpstream()
    server = await start_server(upstream.app())
    _, url = await start_sidecar(proxy_config(str(server.make_url("")).rstrip("/")))

    sent = {"traceparent": UNSAMPLED, "tracestate": "vendor=abc"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/echo/items", headers=sent) as resp:
            assert resp.status == 200
        assert calls == []
        # the upstream sees the caller's context as it came: same trace, flags 00
        assert upstream.headers[0]["traceparent"] == UNSAMPLED
        assert upstream.headers[0]["tracestate"] == "vendor=abc"

        async with http.get(f"{url}/echo/items", headers={"traceparent": TRACEPARENT}) as resp:
            assert resp.status == 200
    assert "extract" in calls and "inject" in calls  # a sampled one takes the SDK's path
    assert [s.kind.name for s in parent_based.get_finished_spans()] == ["CLIENT", "SERVER"]


async def test_with_always_off_a_queued_job_carries_the_trace_stored_with_it(
    always_off: None, start_server: StartServer, start_sidecar: Any, tmp_path: Path
) -> None:
    upstream = RecordingUpstream()
    server = await start_server(upstream.app())
    store = f"sqlite://{tmp_path}/queued.db"
    queue = await open_queue(store)
    stored = {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"}
    await queue.enqueue(upstream_call_job("queued-call", "echo", "POST", "/refunds", trace=stored))
    await queue.close()

    data = {
        **proxy_config(str(server.make_url("")).rstrip("/")),
        "store": store,
        "queue": {"poll_interval": "20ms"},
    }
    await start_sidecar(data)

    async def ran() -> bool:
        return bool(upstream.headers)

    await eventually(ran)
    assert upstream.headers[0]["traceparent"] == TRACEPARENT
    assert upstream.headers[0]["tracestate"] == "vendor=abc"


async def test_what_a_sampled_out_request_passes_ends_with_it_on_a_kept_alive_connection(
    parent_based: InMemorySpanExporter,
) -> None:
    """A request the door drops gets the handler's own coroutine, `PASSED` set in its
    task and never reset: this holds only while aiohttp runs each request in a task of
    its own. The next request on the same connection must start clean and get its span."""
    from proxy.observability.traced import traced

    seen: list[object] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        seen.append(tracing.PASSED.get())
        return web.Response(text="ok")

    server = web.Server(traced(handler, route="/x", own_calls=False))
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    opened: list[None] = []

    async def connection_opened(*_: Any) -> None:
        opened.append(None)

    trace_config = aiohttp.TraceConfig()
    trace_config.on_connection_create_end.append(connection_opened)
    try:
        async with aiohttp.ClientSession(trace_configs=[trace_config]) as http:
            for headers in ({"traceparent": UNSAMPLED}, {}, {"traceparent": UNSAMPLED}, {}):
                async with http.get(f"http://127.0.0.1:{port}/x", headers=headers) as resp:
                    assert resp.status == 200
    finally:
        await runner.cleanup()

    assert len(opened) == 1  # one kept-alive connection carried all four
    assert [p is not None for p in seen] == [True, False, True, False]
    assert [s.kind.name for s in parent_based.get_finished_spans()] == ["SERVER", "SERVER"]
