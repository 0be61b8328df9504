"""Prometheus metrics, fed by the pipeline's hooks and read from live state at scrape time.

Policy code never imports prometheus_client: the pipeline reports events to
`PipelineHooks`, and `Metrics` is one implementation of them. Gauges that describe
state (breaker state, bulkhead in flight) are not updated on every call; a
collector reads them from the upstreams when Prometheus scrapes, which costs the
hot path nothing. Labels are bounded: upstream names come from the config, never
from request paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy.events.outbox import ALL_TYPES, EventHooks, EventOutbox
from proxy.jobs import JobQueue, JobResult, WorkerHooks
from proxy.jobs.queue import CountsDeadLetters, Job
from proxy.observability import tracing as _tracing
from proxy.observability.badrequests import BAD_REQUEST_REASONS
from proxy.observability.callmetrics import CallMetrics
from proxy.resilience.outcome import Outcome
from proxy.resilience.pipeline import PipelineHooks
from proxy.resilience.ratelimit import Admission
from proxy.upstreams import Upstream

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 1.5, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
"""1 ms to 10 s: a fast refusal and a full timeout both land in a resolving bucket."""

OUTCOMES = (
    "ok",
    "error",
    "timeout",
    "circuit_open",
    "bulkhead_full",
    "rate_limited",
    "store_unavailable",
    "fallback",
)
CHECKOUT_RESULTS = (
    "confirmed",
    "pending",
    "rejected",
    "unavailable",
    "replayed",
    "bad_request",
    "idempotency_conflict",
    "error",
)
BREAKER_TRANSITIONS = (
    ("closed", "open"),
    ("open", "half_open"),
    ("half_open", "closed"),
    ("half_open", "open"),
)
COMMON_RETRY_REASONS = ("connect_failure", "timeout", "reset", "status_502", "status_503")
BREAKER_STATES = ("closed", "open", "half_open")
HEDGE_RESULTS = ("won", "lost", "refused")


class Metrics(PipelineHooks):
    """The sidecar's metrics in their own registry (one per sidecar, so tests stay apart)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        # sidecar_requests_total, sidecar_attempts_total, sidecar_request_duration_seconds:
        # updated on every call, so kept as plain numbers (callmetrics.py)
        self.calls = CallMetrics(LATENCY_BUCKETS)
        r.register(self.calls)
        self.retries = Counter(
            "sidecar_retries", "Retries scheduled, by reason.", ["upstream", "reason"], registry=r
        )
        self.budget_refusals = Counter(
            "sidecar_retry_budget_refusals",
            "Retries that the retry budget refused.",
            ["upstream"],
            registry=r,
        )
        self.hedges = Counter(
            "sidecar_hedges",
            "Hedges that came due, by result: won (its answer was used), lost (cancelled "
            "or not used), refused (not sent: budget, breaker or rate limit).",
            ["upstream", "result"],
            registry=r,
        )
        self.transitions = Counter(
            "sidecar_breaker_transitions",
            "Circuit breaker state changes.",
            ["upstream", "from_state", "to_state"],
            registry=r,
        )
        self.fallbacks = Counter(
            "sidecar_fallbacks",
            "Fallback answers served, by reason and source (static or stale).",
            ["upstream", "reason", "source"],
            registry=r,
        )
        self.rate_limited_total = Counter(
            "sidecar_rate_limited",
            "Attempts the upstream's rate limit refused (no token within the deadline).",
            ["upstream", "scope"],
            registry=r,
        )
        self.rate_limit_store_errors = Counter(
            "sidecar_rate_limit_store_errors",
            "Attempts whose shared rate limit could not be asked, by what was done "
            "(refused, or allowed with on_store_down: allow).",
            ["upstream", "action"],
            registry=r,
        )
        self.idempotency = Counter(
            "sidecar_idempotency",
            "Requests with an idempotency key, by what the key did (first, replayed, ...).",
            ["result"],
            registry=r,
        )
        self.jobs = JobMetrics(r)
        self.events = EventMetrics(r)
        self.checkouts = Counter(
            "sidecar_checkouts",
            "Composite checkouts by result (confirmed, pending, rejected, replayed, ...).",
            ["result"],
            registry=r,
        )
        self.checkout_latency = Histogram(
            "sidecar_checkout_duration_seconds",
            "Time to answer a composite checkout.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.reloads = Counter(
            "sidecar_config_reloads",
            "Config reloads by result: ok (applied) or error (refused, old config kept).",
            ["result"],
            registry=r,
        )
        self.last_reload_ok = Gauge(
            "sidecar_config_last_reload_successful",
            "1 when the last reload attempt applied its config, 0 when it was refused.",
            registry=r,
        )
        self.last_reload_ok.set(1)
        self.last_reload_time = Gauge(
            "sidecar_config_last_reload_timestamp_seconds",
            "When the config in force was loaded (Unix time).",
            registry=r,
        )
        self.last_reload_time.set_to_current_time()
        self.compensations = Counter(
            "sidecar_compensations",
            "Compensating calls of rejected checkouts, by step and result.",
            ["step", "result"],
            registry=r,
        )
        self.decisions = Counter(
            "sidecar_checkout_decisions",
            "Checkout decisions: confirmed or rejected.",
            ["decision"],
            registry=r,
        )
        self.bad_requests = Counter(
            "sidecar_bad_requests",
            "Requests refused with 400 because they could not be parsed, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in BAD_REQUEST_REASONS:
            self.bad_requests.labels(reason)
        self.store_durable = Gauge(
            "sidecar_store_durable",
            "1 when the store keeps its data over a restart of its server (SQLite, "
            "PostgreSQL, Redis with AOF or RDB), 0 when not (memory://, Redis without "
            "persistence), -1 when unknown (Redis refused CONFIG GET or did not answer).",
            ["store"],
            registry=r,
        )

    # -- hooks ---------------------------------------------------------------

    def checkout_finished(self, result: str, seconds: float) -> None:
        self.checkouts.labels(result).inc()
        if seconds > 0:
            trace_id = _tracing.TRACING.current_trace_id() if _tracing.TRACING.enabled else None
            exemplar = {"trace_id": trace_id} if trace_id else None
            self.checkout_latency.observe(seconds, exemplar=exemplar)

    def config_reloaded(self, result: str) -> None:
        self.reloads.labels(result).inc()
        self.last_reload_ok.set(1 if result == "ok" else 0)
        if result == "ok":
            self.last_reload_time.set_to_current_time()

    def compensated(self, step: str, result: str) -> None:
        self.compensations.labels(step, result).inc()

    def checkout_decided(self, decision: str) -> None:
        self.decisions.labels(decision).inc()

    def bad_request(self, reason: str) -> None:
        self.bad_requests.labels(reason).inc()

    def store_durability(self, store: str, durable: bool | None) -> None:
        """`store` is idempotency, journal or queue; checked once, at start."""
        self.store_durable.labels(store).set(-1 if durable is None else int(durable))

    def idempotency_result(self, result: str) -> None:
        self.idempotency.labels(result).inc()

    def attempt_finished(self, upstream: str, number: int, outcome: Outcome) -> None:
        self.calls.attempt(upstream, outcome.reason)

    def retry_scheduled(self, upstream: str, reason: str, delay: float) -> None:
        self.retries.labels(upstream, reason).inc()

    def retry_refused(self, upstream: str, reason: str, refused_by: str) -> None:
        if refused_by == "budget":
            self.budget_refusals.labels(upstream).inc()

    def hedge_finished(self, upstream: str, result: str) -> None:
        self.hedges.labels(upstream, result).inc()

    def breaker_transition(self, upstream: str, old: str, new: str) -> None:
        self.transitions.labels(upstream, old, new).inc()

    def request_finished(self, upstream: str, outcome: str, seconds: float) -> None:
        calls = self.calls
        calls.request(upstream, outcome)
        # an exemplar (OpenMetrics scrapes only): a slow bucket leads to its trace; a
        # request that makes no span (PASSED set) has none, known without a call
        tracing = _tracing.TRACING
        trace_id = (
            tracing.current_trace_id()
            if tracing.enabled and _tracing.PASSED.get() is None
            else None
        )
        calls.observe(upstream, seconds, trace_id)

    def fallback_served(self, upstream: str, reason: str, source: str) -> None:
        self.fallbacks.labels(upstream, reason, source).inc()

    def rate_limited(self, upstream: str, scope: str, admission: Admission) -> None:
        if admission.store_down:
            action = "allowed" if admission.granted else "refused"
            self.rate_limit_store_errors.labels(upstream, action).inc()
        else:
            self.rate_limited_total.labels(upstream, scope).inc()

    # -- state read at scrape time ------------------------------------------

    def watch(self, collector: Collector) -> None:
        self.registry.register(collector)

    def prepare_rate_limits(self, limits: Iterable[tuple[str, str]]) -> None:
        """The rate-limited series of each limited upstream at zero, as `prepare` does."""
        for name, scope in limits:
            self.rate_limited_total.labels(name, scope)
            if scope == "shared":
                for action in ("refused", "allowed"):
                    self.rate_limit_store_errors.labels(name, action)

    def prepare(self, upstreams: Iterable[str]) -> None:
        """Create the usual series at zero, so rate() sees the first event of each.

        A counter that appears with its first increment has no earlier sample, so
        Prometheus' rate() and increase() miss that increment (and an alert on the
        first breaker trip never fires).
        """
        for name in upstreams:
            for outcome in OUTCOMES:
                self.calls.prepare_request(name, outcome)
            self.calls.prepare_latency(name)
            for old, new in BREAKER_TRANSITIONS:
                self.transitions.labels(name, old, new)
            for reason in COMMON_RETRY_REASONS:
                self.retries.labels(name, reason)
            self.budget_refusals.labels(name)
            for result in HEDGE_RESULTS:
                self.hedges.labels(name, result)
        for result in CHECKOUT_RESULTS:
            self.checkouts.labels(result)
        for decision in ("confirmed", "rejected"):
            self.decisions.labels(decision)
        for result in ("ok", "error"):
            self.reloads.labels(result)


class StateCollector(Collector):
    """Breaker state, bulkhead occupancy, rate limit fill and certificate expiry, read
    from the live upstreams on each scrape."""

    def __init__(self, upstreams: Callable[[], Iterable[Upstream]]) -> None:
        self._upstreams = upstreams

    def collect(self) -> Iterable[GaugeMetricFamily]:
        state = GaugeMetricFamily(
            "sidecar_breaker_state",
            "1 for the breaker's current state, 0 for the others.",
            labels=["upstream", "state"],
        )
        failure_rate = GaugeMetricFamily(
            "sidecar_breaker_failure_rate",
            "Failure share of the attempts in the breaker's window.",
            labels=["upstream"],
        )
        in_flight = GaugeMetricFamily(
            "sidecar_bulkhead_in_flight", "Calls in flight to the upstream.", labels=["upstream"]
        )
        queued = GaugeMetricFamily(
            "sidecar_bulkhead_queued", "Calls waiting for a bulkhead slot.", labels=["upstream"]
        )
        cert_expiry = GaugeMetricFamily(
            "sidecar_tls_cert_expiry_seconds",
            "Seconds until a configured certificate expires (kind: client or ca; "
            "negative once expired), as loaded now: a rotation on disk shows at once.",
            labels=["upstream", "kind"],
        )
        tokens = GaugeMetricFamily(
            "sidecar_rate_limit_tokens",
            "Tokens at hand in the upstream's rate limit bucket (0 to burst); for a shared "
            "limit, as this replica last saw it.",
            labels=["upstream", "scope"],
        )
        for upstream in self._upstreams():
            name = upstream.name
            policies = upstream.policies
            breaker = policies.breaker
            current = breaker.state if breaker is not None else "closed"
            for each in BREAKER_STATES:
                state.add_metric([name, each], 1.0 if each == current else 0.0)
            if breaker is not None:
                failure_rate.add_metric([name], breaker.failure_rate)
            in_flight.add_metric([name], float(policies.bulkhead.in_flight))
            queued.add_metric([name], float(policies.bulkhead.queued))
            tls = upstream.tls
            if tls is not None:
                tls.refresh()  # a renewal shows at the next scrape, even with no traffic
                for kind, seconds in tls.seconds_left():
                    cert_expiry.add_metric([name, kind], seconds)
            limiter = policies.limiter
            if limiter is not None:
                tokens.add_metric([name, limiter.options.scope], limiter.level())
        yield from (state, failure_rate, in_flight, queued, cert_expiry, tokens)


class JobMetrics(WorkerHooks):
    """The durable queue's metrics: results from the worker, sizes read from the queue."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.results = Counter(
            "sidecar_jobs",
            "Job runs by type and result (ok, retry, dead).",
            ["type", "result"],
            registry=registry,
        )
        self.depth = Gauge(
            "sidecar_queue_depth",
            "Jobs not yet done (pending, delayed or running).",
            registry=registry,
        )
        self.dead = Gauge(
            "sidecar_queue_dead_letters", "Jobs in the dead-letter list.", registry=registry
        )
        self.oldest = Gauge(
            "sidecar_queue_oldest_job_age_seconds",
            "Age of the oldest job not yet done (0 when empty).",
            registry=registry,
        )
        self.redeliveries = Counter(
            "sidecar_job_redeliveries",
            "Jobs taken again after an earlier delivery (lapsed lease, abandoned entry, "
            "broker redelivery), by queue backend.",
            ["backend"],
            registry=registry,
        )

    def on_result(self, job_type: str, result: JobResult) -> None:
        self.results.labels(job_type, result).inc()

    def on_redelivery(self, backend: str, job: Job) -> None:
        self.redeliveries.labels(backend).inc()

    async def refresh(self, queue: JobQueue | None) -> None:
        """Read the queue's sizes; called at scrape time (they are queries, not events)."""
        if queue is None:
            return
        try:
            self.depth.set(await queue.depth())
            self.oldest.set(await queue.oldest_age() or 0.0)
            if isinstance(queue, CountsDeadLetters):
                self.dead.set(await queue.dead_count())
            else:
                self.dead.set(len(await queue.dead(limit=100_000)))
        except Exception:  # a scrape must not fail because the store hiccuped
            return


class EventMetrics(EventHooks):
    """The events outbox's metrics: publish results from its hooks, its size at scrape."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.published_total = Counter(
            "sidecar_events_published",
            "Checkout events published, by type and result (ok: confirmed by the broker).",
            ["type", "result"],
            registry=registry,
        )
        self.outbox_pending = Gauge(
            "sidecar_events_outbox_pending",
            "Checkout events in the journal's outbox, not yet confirmed by the broker.",
            registry=registry,
        )
        for event_type in ALL_TYPES:  # at zero, so rate() sees the first of each
            for result in ("ok", "error"):
                self.published_total.labels(event_type, result)

    def published(self, event_type: str, result: str) -> None:
        self.published_total.labels(event_type, result).inc()

    async def refresh(self, outbox: EventOutbox | None) -> None:
        """Read the outbox's size; called at scrape time (a query, not an event)."""
        if outbox is None:
            return
        try:
            self.outbox_pending.set(await outbox.pending())
        except Exception:  # a scrape must not fail because the journal hiccuped
            return
