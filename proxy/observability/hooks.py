"""The pipeline's telemetry: every event to metrics, the rare ones also to the log.

One object the pipeline reports to, so policy code stays free of telemetry and
the hot path (an attempt, a finished request) costs one metrics update and no log
line, while the events an SRE wants to read (a breaker opening, a retry, a
fallback) are also written as JSON lines with their fields.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

from opentelemetry.trace import Span

from proxy.checkout.answer import Answer, StepState
from proxy.checkout.hooks import NO_SPAN, CheckoutHooks, CheckoutSpan
from proxy.checkout.states import ActionResult, Decision, StepStatus
from proxy.client import OutgoingRequest
from proxy.jobs import Job, JobResult, WorkerHooks
from proxy.observability import tracing as _tracing
from proxy.observability.metrics import Metrics
from proxy.resilience.outcome import Outcome
from proxy.resilience.pipeline import AttemptFn
from proxy.resilience.ratelimit import Admission
from proxy.upstreams import Upstream, UpstreamHooks

log = logging.getLogger("proxy.events")


class _CheckoutSpan(CheckoutSpan):
    def __init__(self, span: Span) -> None:
        self.span = span

    def answered(self, answer: Answer) -> None:
        self.span.set_attributes(
            {
                "sidecar.checkout.status": answer.body.get("status", ""),
                "sidecar.checkout.decision": answer.body.get("decision", ""),
                "http.response.status_code": answer.status,
            }
        )

    def ended(self, result: str) -> None:
        self.span.set_attribute("sidecar.checkout.result", result)


class Telemetry(UpstreamHooks, CheckoutHooks):
    """The pipeline's and the checkout's events, to metrics, traces and the log."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def wrap_attempt(
        self, upstream: Upstream, request: OutgoingRequest, attempt: AttemptFn
    ) -> AttemptFn:
        """Each attempt in its own CLIENT span, whose context travels in traceparent.

        A request that makes no span (propagation only, or not sampled at the door)
        sends the trace headers it came with: a proxied request already forwards them,
        a checkout's or a job's own calls get them here. Nothing of the SDK runs.
        """
        tracing = _tracing.TRACING
        if not tracing.active:
            return attempt
        passed = _tracing.PASSED.get()
        if passed is not None:
            if type(passed) is dict and passed:  # not a proxied request's own headers
                request.headers.update(passed)
            return attempt
        if not tracing.enabled:
            return attempt
        if not tracing.recording():
            # not sampled: pass the caller's context on without making spans of our own
            tracing.inject(request.headers)
            return attempt

        async def traced(number: int, seconds: float) -> Outcome:
            with tracing.client_span(
                upstream.name, request.method, str(request.url), number - 1, upstream.breaker_state
            ) as span:
                tracing.inject(request.headers)
                outcome = await attempt(number, seconds)
                span.set_attribute("sidecar.outcome", outcome.reason)
                if outcome.is_response:
                    span.set_attribute("http.response.status_code", outcome.status)
                    if outcome.status >= 500:
                        tracing.fail(span, f"HTTP {outcome.status}")
                else:
                    tracing.fail(span, outcome.reason)
                return outcome

        return traced

    def attempt_finished(self, upstream: str, number: int, outcome: Outcome) -> None:
        self.metrics.attempt_finished(upstream, number, outcome)

    def retry_scheduled(self, upstream: str, reason: str, delay: float) -> None:
        self.metrics.retry_scheduled(upstream, reason, delay)
        if _tracing.TRACING.enabled:
            _tracing.TRACING.note(
                "retry", {"sidecar.retry.reason": reason, "delay_ms": delay * 1e3}
            )
        log.info(
            "retrying %s after %s",
            upstream,
            reason,
            extra={
                "event": "retry",
                "upstream": upstream,
                "reason": reason,
                "delay_ms": round(delay * 1000, 1),
            },
        )

    def retry_refused(self, upstream: str, reason: str, refused_by: str) -> None:
        self.metrics.retry_refused(upstream, reason, refused_by)
        if refused_by == "budget":
            log.warning(
                "retry budget spent for %s",
                upstream,
                extra={"event": "retry_budget_refused", "upstream": upstream, "reason": reason},
            )

    def breaker_transition(self, upstream: str, old: str, new: str) -> None:
        self.metrics.breaker_transition(upstream, old, new)
        level = logging.WARNING if new == "open" else logging.INFO
        log.log(
            level,
            "breaker of %s: %s -> %s",
            upstream,
            old,
            new,
            extra={"event": "breaker_transition", "upstream": upstream, "from": old, "to": new},
        )

    def request_finished(self, upstream: str, outcome: str, seconds: float) -> None:
        self.metrics.request_finished(upstream, outcome, seconds)

    def fallback_served(self, upstream: str, reason: str, source: str) -> None:
        self.metrics.fallback_served(upstream, reason, source)
        if _tracing.TRACING.enabled:
            _tracing.TRACING.set(
                {"sidecar.fallback.reason": reason, "sidecar.fallback.source": source}
            )
        log.info(
            "fallback for %s (%s)",
            upstream,
            reason,
            extra={"event": "fallback", "upstream": upstream, "reason": reason, "source": source},
        )

    def rate_limited(self, upstream: str, scope: str, admission: Admission) -> None:
        self.metrics.rate_limited(upstream, scope, admission)

    def hedge_finished(self, upstream: str, result: str) -> None:
        self.metrics.hedge_finished(upstream, result)

    def rate_limit_paused(self, upstream: str, seconds: float) -> None:
        log.warning(
            "%s asked to slow down: its rate limit pauses for %.1f s",
            upstream,
            seconds,
            extra={
                "event": "rate_limit_paused",
                "upstream": upstream,
                "pause_ms": round(seconds * 1000, 1),
            },
        )

    # -- checkout events -------------------------------------------------------

    def trace_context(self) -> dict[str, str] | None:
        """The trace to keep with the checkout: ours, or the caller's when we make no span."""
        tracing = _tracing.TRACING
        if not tracing.active:
            return None
        passed = _tracing.PASSED.get()
        if passed is not None:
            # a dict is the trace headers already; other mappings are a request's headers
            trace = dict(passed) if type(passed) is dict else tracing.incoming(passed)
            return trace or None
        return tracing.carrier() if tracing.enabled else None

    @contextlib.contextmanager
    def checkout_span(self, checkout_id: str) -> Iterator[CheckoutSpan]:
        tracing = _tracing.TRACING
        if not tracing.enabled or _tracing.PASSED.get() is not None:
            yield NO_SPAN
            return
        with tracing.internal_span("checkout", {"sidecar.checkout.id": checkout_id}) as span:
            yield _CheckoutSpan(span)

    async def around_step(
        self, step: str, upstream: str, run: Callable[[], Awaitable[StepState]]
    ) -> StepState:
        tracing = _tracing.TRACING
        if not tracing.enabled or _tracing.PASSED.get() is not None:
            return await run()
        attributes = {"sidecar.step": step, "sidecar.upstream": upstream}
        with tracing.internal_span(f"step {step}", attributes) as span:
            state = await run()
            span.set_attributes(
                {"sidecar.step.status": str(state.status), "sidecar.step.attempts": state.attempts}
            )
            if state.status == StepStatus.FALLBACK:
                span.set_attribute("sidecar.fallback.reason", state.reason)
            elif state.status == StepStatus.FAILED:
                tracing.fail(span, state.reason)
            return state

    def decided(self, decision: Decision) -> None:
        self.metrics.checkout_decided(decision)
        log.info(
            "checkout %s",
            decision,
            extra={"event": "checkout_decided", "decision": str(decision)},
        )

    def compensated(self, step: str, result: ActionResult | str) -> None:
        self.metrics.compensated(step, str(result))
        log.info(
            "compensation of %s: %s",
            step,
            result,
            extra={"event": "compensation", "step": step, "result": str(result)},
        )

    def answered(self, result: str, seconds: float) -> None:
        self.metrics.checkout_finished(result, seconds)


class JobTelemetry(WorkerHooks):
    """The queue worker's events: results to metrics, each job in a span when tracing."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def on_result(self, job_type: str, result: JobResult) -> None:
        self.metrics.jobs.on_result(job_type, result)

    def on_redelivery(self, backend: str, job: Job) -> None:
        self.metrics.jobs.on_redelivery(backend, job)

    async def around_job(self, job: Job, run: Callable[[], Awaitable[None]]) -> None:
        """The job in a span linked to the trace that queued it (even after a restart).

        With propagation only there is no span: the job's calls carry the stored trace
        headers, so the upstream still sees a compensation as part of its checkout.
        """
        tracing = _tracing.TRACING
        if not tracing.active:
            await run()
            return
        if not tracing.enabled:
            with tracing.passing(job.trace):
                await run()
            return
        token = _tracing.PASSED.set(None)  # the job is its own trace, whoever ran it
        try:
            with tracing.job_span(job.type, job.id, job.trace) as span:
                span.set_attribute("sidecar.job.attempts", job.attempts + 1)
                try:
                    await run()
                except Exception as exc:
                    tracing.fail(span, f"{type(exc).__name__}: {exc}")
                    raise
        finally:
            _tracing.PASSED.reset(token)
