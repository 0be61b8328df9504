"""The rate limit inside the pipeline: before each attempt, on a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.resilience.breaker import Breaker, BreakerOptions, is_failure
from proxy.resilience.clock import FakeClock
from proxy.resilience.deadline import Deadline
from proxy.resilience.outcome import Kind, Outcome
from proxy.resilience.pipeline import Pipeline
from proxy.resilience.ratelimit import Admission, LocalLimiter, RateLimitOptions, SharedLimiter
from proxy.resilience.rules import may_have_acted, never_sent
from tests.resilience.test_pipeline import Recorder, make_pipeline, scripted
from tests.resilience.test_ratelimit import FlakyStore


class LimitRecorder(Recorder):
    def rate_limited(self, upstream: str, scope: str, admission: Admission) -> None:
        self.events.append(("rate_limited", scope, admission.granted, admission.store_down))

    def rate_limit_paused(self, upstream: str, seconds: float) -> None:
        self.events.append(("paused", seconds))


def limited(clock: FakeClock, rate: float = 10.0, burst: int = 1, **kw: Any) -> Pipeline:
    limiter = LocalLimiter(RateLimitOptions(rate=rate, burst=burst), clock)
    return make_pipeline(clock, limiter=limiter, **kw)


async def test_a_call_over_the_limit_that_cannot_wait_is_refused_unsent_with_retry_after() -> None:
    clock = FakeClock()
    hooks = LimitRecorder()
    pipeline = limited(clock, rate=1.0, hooks=hooks)
    attempt, seen = scripted([Outcome(Kind.RESPONSE, 200)], clock)
    first = await pipeline.call(attempt, Deadline.after(3.0, clock), retryable=True)
    refused = await pipeline.call(attempt, Deadline.after(0.5, clock), retryable=True)
    assert first.outcome.status == 200
    assert refused.outcome.kind is Kind.RATE_LIMITED and refused.attempts == 0
    assert refused.outcome.retry_after == pytest.approx(0.99)
    assert never_sent(refused.outcome)
    assert len(seen) == 1
    assert ("rate_limited", "local", False, False) in hooks.events


async def test_a_call_over_the_limit_waits_for_its_token_when_the_deadline_allows() -> None:
    clock = FakeClock()
    pipeline = limited(clock, rate=10.0)
    attempt, seen = scripted([Outcome(Kind.RESPONSE, 200)] * 2, clock, took=0.0)
    await pipeline.call(attempt, Deadline.after(3.0, clock), retryable=True)
    started = clock.now
    result = await pipeline.call(attempt, Deadline.after(1.0, clock), retryable=True)
    assert result.outcome.status == 200
    assert clock.now - started == pytest.approx(0.1)
    assert seen[1][1] == pytest.approx(0.9)  # the attempt gets what the wait left


async def test_retries_spend_tokens_like_first_attempts() -> None:
    clock = FakeClock()
    hooks = LimitRecorder()
    pipeline = limited(clock, rate=1.0, burst=2, hooks=hooks)
    attempt, seen = scripted([Outcome(Kind.RESPONSE, 503)] * 3, clock, took=0.0)
    result = await pipeline.call(attempt, Deadline.after(0.9, clock), retryable=True)
    # two tokens: the first attempt and one retry; the second retry finds none in time
    assert len(seen) == 2
    assert result.outcome.status == 503 and result.exhausted
    assert ("refused", "status_503", "rate_limit") in hooks.events


async def test_an_upstreams_429_with_retry_after_pauses_its_bucket() -> None:
    clock = FakeClock()
    hooks = LimitRecorder()
    pipeline = limited(clock, rate=100.0, burst=10, hooks=hooks)
    busy = Outcome(Kind.RESPONSE, 429, retry_after=2.0)
    attempt, seen = scripted([busy, Outcome(Kind.RESPONSE, 200)], clock, took=0.0)
    answered = await pipeline.call(attempt, Deadline.after(3.0, clock), retryable=True)
    assert answered.outcome.status == 429  # 429 is not retried unless configured
    refused = await pipeline.call(attempt, Deadline.after(1.0, clock), retryable=True)
    assert refused.outcome.kind is Kind.RATE_LIMITED
    assert refused.outcome.retry_after == pytest.approx(2.0)
    assert ("paused", 2.0) in hooks.events
    clock.advance(2.0)
    again = await pipeline.call(attempt, Deadline.after(1.0, clock), retryable=True)
    assert again.outcome.status == 200 and len(seen) == 2


async def test_a_refusal_gives_the_breakers_half_open_probe_back() -> None:
    clock = FakeClock()
    breaker = Breaker(
        BreakerOptions(min_calls=1, failure_rate=0.5, open_for=1.0, half_open_probes=1), clock
    )
    pipeline = limited(clock, rate=0.1, breaker=breaker)
    attempt, seen = scripted([Outcome(Kind.RESPONSE, 503)], clock, took=0.0)
    await pipeline.call(attempt, Deadline.after(3.0, clock), retryable=False)
    assert breaker.state == "open"
    clock.advance(1.0)  # half-open: one probe slot
    refused = await pipeline.call(attempt, Deadline.after(0.5, clock), retryable=True)
    assert refused.outcome.kind is Kind.RATE_LIMITED and len(seen) == 1
    assert breaker.try_acquire() is not None  # the refused call held no probe slot


async def test_a_shared_limit_whose_store_is_down_refuses_with_store_unavailable() -> None:
    clock = FakeClock()
    store = FlakyStore(clock)
    store.down = True
    hooks = LimitRecorder()
    limiter = SharedLimiter(store, "payment", RateLimitOptions(10.0, 1, "shared"), clock)
    pipeline = make_pipeline(clock, limiter=limiter, hooks=hooks)
    attempt, seen = scripted([Outcome(Kind.RESPONSE, 200)], clock)
    result = await pipeline.call(attempt, Deadline.after(1.0, clock), retryable=True)
    assert result.outcome.kind is Kind.STORE_UNAVAILABLE and not seen
    assert result.outcome.retry_after == 1.0
    assert never_sent(result.outcome)
    assert ("rate_limited", "shared", False, True) in hooks.events


async def test_on_store_down_allow_sends_the_call_and_reports_it() -> None:
    clock = FakeClock()
    store = FlakyStore(clock)
    store.down = True
    hooks = LimitRecorder()
    options = RateLimitOptions(10.0, 1, "shared", on_store_down="allow")
    pipeline = make_pipeline(
        clock, limiter=SharedLimiter(store, "payment", options, clock), hooks=hooks
    )
    attempt, seen = scripted([Outcome(Kind.RESPONSE, 200)], clock)
    result = await pipeline.call(attempt, Deadline.after(1.0, clock), retryable=True)
    assert result.outcome.status == 200 and len(seen) == 1
    assert ("rate_limited", "shared", True, True) in hooks.events


@pytest.mark.parametrize("kind", [Kind.RATE_LIMITED, Kind.STORE_UNAVAILABLE])
def test_a_rate_limit_refusal_was_never_sent_and_is_no_breaker_failure(kind: Kind) -> None:
    outcome = Outcome(kind)
    assert never_sent(outcome)
    assert not may_have_acted(outcome)
    assert not is_failure(outcome)
    assert not is_failure(Outcome(Kind.RESPONSE, 429, retry_after=2.0))
