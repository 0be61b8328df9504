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

A request that will record no span costs next to nothing, because the SDK's
non-recording spans are not free (about +39% CPU per proxied request for a
sampler of `always_off`, before this was added): extracting the context, running the
sampler, a span object, a context attached and detached, and injecting it again.
So the decision is taken as early and as cheaply as it can be:

- at configure time, a sampler that can never sample (`always_off`, `traceidratio`
  of 0, a `parentbased_*` whose every branch is one of those) makes tracing
  *propagation only*: no SDK provider, no span, nothing per proxied request; the
  checkout's and the jobs' own upstream calls carry the incoming (or stored) trace
  headers as they came, so the caller's trace still reaches the upstreams;
- at the door, a parent-based sampler's answer is known from the `traceparent`
  alone (sampled flag, or no parent and a root sampler that never samples): such a
  request also only propagates (`PASSED`), without touching the SDK.

The SERVER side of this, applied to the app's handlers, is `traced.traced`.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

SERVICE_NAME = "checkout-sidecar"

PASSED: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "sidecar_trace_passed", default=None
)
"""Set while a request (or a job) makes no span: the trace headers it came with.

A dict holds only the trace headers (possibly none): the upstream calls of our own
(a checkout's, a job's) send them as they are, instead of a context of ours. Any
other mapping is a proxied request's own headers, which its upstream call forwards
anyway: nothing is added, nothing was copied. The `around_*` hooks see it set and
make no span; log lines read the caller's trace id from it. A ContextVar, so the
checkout's fan-out tasks and a job's calls inherit it and nothing else sees it.
"""

_W3C_FIELDS = frozenset({"traceparent", "tracestate", "baggage"})
# the SDK's own pattern and length limit, so the door reads a traceparent as extract() does
_TRACEPARENT = TraceContextTextMapPropagator._TRACEPARENT_HEADER_FORMAT_RE
_TRACEPARENT_MAX = TraceContextTextMapPropagator._TRACEPARENT_MAXIMUM_LENGTH
# the usual shape (55 characters, no leading or trailing space, no extra field) of a
# valid parent (not version ff, no all-zero id), which the SDK's pattern reads the same
# way: matched whole, without its search and groups, in one pass; whatever it refuses
# goes the slow way (`_drops_unusual`), which knows every other case
_CANONICAL = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
)
_NO_TRACE_ID = "0" * 32
_NO_SPAN_ID = "0" * 16
_SAMPLED_LAST_DIGIT = frozenset("13579bdf")  # flags with bit 0 set, read from the low digit


def never_samples(sampler: Any) -> bool:
    """Whether `sampler` drops every span, whatever the parent and the trace id.

    Only the SDK's own samplers are known; any other (a custom one, a jaeger remote
    sampler) may sample, so it keeps the full path. ParentBased keeps its branches in
    private attributes; a future SDK without them reads as "may sample" too.
    """
    from opentelemetry.sdk.trace.sampling import (
        Decision,
        ParentBased,
        StaticSampler,
        TraceIdRatioBased,
    )

    if isinstance(sampler, StaticSampler):
        return getattr(sampler, "_decision", None) is Decision.DROP
    if isinstance(sampler, TraceIdRatioBased):
        return sampler.bound <= 0
    if isinstance(sampler, ParentBased):
        branches = [getattr(sampler, name, None) for name in _PARENT_BASED_BRANCHES]
        return all(b is not None and never_samples(b) for b in branches)
    return False


_PARENT_BASED_BRANCHES = (
    "_root",
    "_remote_parent_sampled",
    "_remote_parent_not_sampled",
    "_local_parent_sampled",
    "_local_parent_not_sampled",
)


class _Door:
    """What a parent-based sampler will say about a request, from its headers alone.

    `None` when the sampler is not parent-based, or when it may sample on every
    branch: then every request takes the SDK's path. Only the remote branches and
    the root matter at the door: a SERVER span's parent, if any, is the caller's.
    """

    def __init__(self, root_off: bool, sampled_off: bool, unsampled_off: bool) -> None:
        self.root_off = root_off
        self.sampled_off = sampled_off
        self.unsampled_off = unsampled_off

    @classmethod
    def of(cls, sampler: Any) -> _Door | None:
        from opentelemetry.sdk.trace.sampling import ParentBased

        if not isinstance(sampler, ParentBased):
            return None
        root, sampled, unsampled = (
            getattr(sampler, name, None)
            for name in ("_root", "_remote_parent_sampled", "_remote_parent_not_sampled")
        )
        if root is None or sampled is None or unsampled is None:
            return None
        door = cls(never_samples(root), never_samples(sampled), never_samples(unsampled))
        if not (door.root_off or door.sampled_off or door.unsampled_off):
            return None
        return door

    def drops(self, traceparent: str | None) -> bool:
        """True when the SDK would make the SERVER span (and so its children) non-recording."""
        if not traceparent:
            return self.root_off
        if len(traceparent) == 55 and _CANONICAL.fullmatch(traceparent) is not None:
            sampled = traceparent[54] in _SAMPLED_LAST_DIGIT
            return self.sampled_off if sampled else self.unsampled_off
        return self._drops_unusual(traceparent)

    def _drops_unusual(self, traceparent: str) -> bool:
        """Any other shape (spaces around, a later version's fields, an invalid parent),
        read as extract() does; what extract() rejects is no parent: the root decides."""
        match = _TRACEPARENT.search(traceparent) if len(traceparent) <= _TRACEPARENT_MAX else None
        if match is None:
            return self.root_off
        version, trace_id, span_id, flags, rest = match.groups()
        if (
            version == "ff"
            or (version == "00" and rest)
            or trace_id == _NO_TRACE_ID
            or span_id == _NO_SPAN_ID
        ):
            return self.root_off
        sampled = int(flags, 16) & 1
        return self.sampled_off if sampled else self.unsampled_off


def _propagated_fields() -> frozenset[str]:
    """The header names the process's propagators read (OTEL_PROPAGATORS), lower case."""
    return frozenset(name.lower() for name in propagate.get_global_textmap().fields)


class Tracing:
    """The sidecar's tracer, or nothing at all when tracing is off.

    `enabled`: spans may be recorded (`traced()` wraps the handlers in SERVER spans).
    `propagate_only`: configured, but the sampler can never sample: no span is made,
    the incoming trace headers are only passed on. `active`: either, the one check a
    call site makes when tracing is off altogether.
    """

    def __init__(self, provider: Any = None, *, propagate_only: bool = False) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self.propagate_only = propagate_only and not self.enabled
        self.active = self.enabled or self.propagate_only
        self.tracer: Tracer | None = (
            provider.get_tracer("checkout-sidecar", "0.1.0") if provider is not None else None
        )
        self.fields = _propagated_fields() if self.active else frozenset()
        sampler = getattr(provider, "sampler", None)
        # the door reads traceparent only: with other propagators (b3, jaeger) the SDK decides
        self.door = _Door.of(sampler) if self.fields <= _W3C_FIELDS else None

    # -- requests that make no span --------------------------------------------

    def incoming(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The trace headers a request came with (those the propagators read), as sent."""
        return {name: value for name in self.fields if (value := headers.get(name)) is not None}

    def drops(self, headers: Mapping[str, str]) -> bool:
        """Whether a request with these headers would record no span: decided at the door."""
        door = self.door
        return door is not None and door.drops(headers.get("traceparent"))

    @contextlib.contextmanager
    def passing(self, carrier: Mapping[str, str] | None) -> Iterator[None]:
        """Run without spans of ours, the upstream calls carrying `carrier` as it is."""
        passed = {k: v for k, v in (carrier or {}).items() if k.lower() in self.fields}
        token = PASSED.set(passed)
        try:
            yield
        finally:
            PASSED.reset(token)

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
        """The current trace id in hex, for an exemplar; None when not sampled.

        A request that makes no span (`PASSED` set) has none, without asking the SDK.
        """
        if PASSED.get() is not None:
            return None
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
    """Tracing as the `OTEL_*` variables say: off unless an OTLP endpoint is set.

    A sampler that can never sample gives propagation only, with no provider at all:
    no exporter thread, no span, the caller's trace headers still passed upstream.
    """
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
    provider = TracerProvider(resource=resource)  # reads OTEL_TRACES_SAMPLER(_ARG)
    if never_samples(provider.sampler):
        provider.shutdown()  # no processor yet: only unregisters its atexit hook
        return Tracing(None, propagate_only=True)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Tracing(provider)
