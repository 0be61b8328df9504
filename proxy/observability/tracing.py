"""OpenTelemetry traces: a span per request, per checkout and step, per attempt.

Configured only by the standard `OTEL_*` variables, as an SRE would set them for
any service: with no `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) set,
tracing is off and every call site below is one attribute check, so it costs
nothing measurable. With an endpoint, spans go out over OTLP/HTTP in batches; the
SDK reads `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
`OTEL_BSP_*` and the exporter's own variables itself.

W3C `traceparent`/`tracestate` and baggage are taken from the incoming request and
sent upstream on every attempt. Queued jobs keep their checkout's trace context in
the job, so a compensation that runs minutes later, or after a restart, is linked
to the checkout that asked for it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer

SERVICE_NAME = "checkout-sidecar"


class Tracing:
    """The sidecar's tracer, or nothing at all when tracing is off."""

    def __init__(self, provider: Any = None) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self.tracer: Tracer | None = (
            provider.get_tracer("checkout-sidecar", "0.1.0") if provider is not None else None
        )

    # -- spans --------------------------------------------------------------

    @contextlib.contextmanager
    def server_span(self, method: str, route: str, headers: Mapping[str, str]) -> Iterator[Span]:
        """The SERVER span of an incoming request, continuing the caller's trace."""
        assert self.tracer is not None
        parent = propagate.extract(headers)
        with self.tracer.start_as_current_span(
            f"{method} {route}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route},
        ) as span:
            yield span

    @contextlib.contextmanager
    def internal_span(
        self,
        name: str,
        attributes: Mapping[str, Any] | None = None,
        links: list[Link] | None = None,
    ) -> Iterator[Span]:
        assert self.tracer is not None
        with self.tracer.start_as_current_span(
            name, kind=SpanKind.INTERNAL, attributes=dict(attributes or {}), links=links
        ) as span:
            yield span

    @contextlib.contextmanager
    def client_span(
        self, upstream: str, method: str, url: str, resend_count: int, breaker_state: str
    ) -> Iterator[Span]:
        """The CLIENT span of one attempt; retries are separate spans (HTTP semconv)."""
        assert self.tracer is not None
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.full": url,
            "sidecar.upstream": upstream,
            "sidecar.breaker.state": breaker_state,
        }
        if resend_count:
            attributes["http.request.resend_count"] = resend_count
        with self.tracer.start_as_current_span(
            f"{method}", kind=SpanKind.CLIENT, attributes=attributes
        ) as span:
            yield span

    @contextlib.contextmanager
    def job_span(
        self, job_type: str, job_id: str, carrier: Mapping[str, str] | None
    ) -> Iterator[Span]:
        """A queued job's span, linked to the trace that queued it (even after a restart)."""
        assert self.tracer is not None
        links = []
        if carrier:
            span_context = trace.get_current_span(propagate.extract(carrier)).get_span_context()
            if span_context.is_valid:
                links.append(Link(span_context))
        # a new trace: the job is its own unit of work, tied to its cause by the link
        token = otel_context.attach(otel_context.Context())
        try:
            with self.tracer.start_as_current_span(
                f"job {job_type}",
                kind=SpanKind.CONSUMER,
                links=links,
                attributes={"sidecar.job.type": job_type, "sidecar.job.id": job_id},
            ) as span:
                yield span
        finally:
            otel_context.detach(token)

    # -- propagation and notes on the current span -------------------------------

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Write the current trace context (traceparent, tracestate, baggage) into headers."""
        propagate.inject(headers)

    def carrier(self) -> dict[str, str]:
        """The current trace context as a dict, to keep with a job or a journal record."""
        out: dict[str, str] = {}
        propagate.inject(out)
        return out

    @staticmethod
    def recording() -> bool:
        """Whether the current span is sampled (a non-recording one makes no children)."""
        return trace.get_current_span().is_recording()

    def note(self, name: str, attributes: Mapping[str, Any]) -> None:
        """An event on the current span (a retry scheduled, a fallback served)."""
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(name, dict(attributes))

    def set(self, attributes: Mapping[str, Any]) -> None:
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(dict(attributes))

    @staticmethod
    def fail(span: Span, description: str) -> None:
        span.set_status(Status(StatusCode.ERROR, description))

    def current_trace_id(self) -> str | None:
        """The current trace id in hex, for an exemplar; None when not sampled."""
        context = trace.get_current_span().get_span_context()
        if not context.is_valid or not context.trace_flags.sampled:
            return None
        return f"{context.trace_id:032x}"

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


OFF = Tracing(None)
TRACING = OFF
"""The process's tracing; `configure` replaces it. Call sites read `TRACING.enabled`."""


def configure(tracing: Tracing) -> Tracing:
    global TRACING
    TRACING = tracing
    return tracing


def from_environment(environ: Mapping[str, str] | None = None) -> Tracing:
    """Tracing as the `OTEL_*` variables say: off unless an OTLP endpoint is set."""
    env = os.environ if environ is None else environ
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not endpoint or env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return OFF
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # the variables' resource (OTEL_SERVICE_NAME, or service.name in
    # OTEL_RESOURCE_ATTRIBUTES) wins; our name only replaces the SDK's unknown_service
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracing(provider)
