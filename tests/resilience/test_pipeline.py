"""The pipeline's control flow, with scripted attempts, a fake clock and a fake sleep."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest

from proxy.resilience.backoff import BackoffOptions
from proxy.resilience.clock import FakeClock
from proxy.resilience.deadline import Deadline
from proxy.resilience.outcome import Kind, Outcome
from proxy.resilience.pipeline import Pipeline, PipelineHooks
from proxy.resilience.retry import RetryOptions

RETRY = RetryOptions(attempts=3, backoff=BackoffOptions(0.1, 2, 2.0, "none"))


class Recorder(PipelineHooks):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def attempt_finished(self, upstream: str, number: int, outcome: Outcome) -> None:
        self.events.append(("attempt", number, outcome.reason))

    def retry_scheduled(self, upstream: str, reason: str, delay: float) -> None:
        self.events.append(("retry", reason, round(delay, 3)))

    def retry_refused(self, upstream: str, reason: str, refused_by: str) -> None:
        self.events.append(("refused", reason, refused_by))


def scripted(outcomes: Iterable[Outcome], clock: FakeClock, took: float = 0.01):
    queue = list(outcomes)
    seen: list[tuple[int, float]] = []

    async def attempt(number: int, seconds: float) -> Outcome:
        seen.append((number, seconds))
        clock.advance(took)
        return queue.pop(0)

    return attempt, seen


def make_pipeline(clock: FakeClock, hooks: PipelineHooks | None = None, **kw) -> Pipeline:
    async def fake_sleep(seconds: float) -> None:
        clock.advance(seconds)

    kw.setdefault("retry", RETRY)
    kw.setdefault("per_try", 1.0)
    return Pipeline("payment", hooks=hooks, clock=clock, sleep=fake_sleep, **kw)


async def test_failing_twice_then_succeeding_takes_three_attempts() -> None:
    clock = FakeClock()
    hooks = Recorder()
    attempt, seen = scripted(
        [Outcome(Kind.RESPONSE, 503), Outcome(Kind.RESET), Outcome(Kind.RESPONSE, 200)], clock
    )
    result = await make_pipeline(clock, hooks).call(
        attempt, Deadline.after(5, clock), retryable=True
    )
    assert result.outcome.status == 200
    assert result.attempts == 3
    assert [n for n, _ in seen] == [1, 2, 3]
    assert hooks.events == [
        ("attempt", 1, "upstream_5xx"),
        ("retry", "status_503", 0.1),
        ("attempt", 2, "reset"),
        ("retry", "reset", 0.2),
        ("attempt", 3, "ok"),
    ]


async def test_a_request_that_cannot_be_resent_is_tried_once() -> None:
    clock = FakeClock()
    attempt, _seen = scripted([Outcome(Kind.RESPONSE, 503)], clock)
    result = await make_pipeline(clock).call(attempt, Deadline.after(5, clock), retryable=False)
    assert result.attempts == 1
    assert result.outcome.status == 503
    assert result.exhausted


async def test_each_attempt_gets_at_most_per_try_and_at_most_the_deadline() -> None:
    clock = FakeClock()
    attempt, seen = scripted([Outcome(Kind.RESET)] * 3, clock, took=0.2)
    await make_pipeline(clock, per_try=0.5).call(
        attempt, Deadline.after(0.8, clock), retryable=True
    )
    # 0.8 left -> 0.5 per try; then 0.6 - 0.1 backoff -> 0.5; then 0.3 - 0.2 -> 0.1
    assert [round(s, 3) for _, s in seen] == [0.5, 0.5, 0.1]


async def test_no_retry_starts_when_the_deadline_cannot_cover_its_backoff() -> None:
    clock = FakeClock()
    hooks = Recorder()
    attempt, _seen = scripted([Outcome(Kind.RESET)] * 3, clock, took=0.25)
    result = await make_pipeline(clock, hooks).call(
        attempt, Deadline.after(0.3, clock), retryable=True
    )
    assert result.attempts == 1
    assert ("refused", "reset", "deadline") in hooks.events


async def test_an_attempt_that_overruns_per_try_is_a_timeout() -> None:
    clock = FakeClock()

    async def hang(number: int, seconds: float) -> Outcome:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    pipeline = make_pipeline(clock, per_try=0.02, retry=RetryOptions(attempts=1))
    result = await pipeline.call(hang, Deadline.after(5, clock), retryable=True)
    assert result.outcome.kind is Kind.TIMEOUT
    assert result.attempts == 1


async def test_an_expired_deadline_makes_no_attempt() -> None:
    clock = FakeClock()
    attempt, seen = scripted([], clock)
    result = await make_pipeline(clock).call(attempt, Deadline.after(0, clock), retryable=True)
    assert result.outcome.kind is Kind.TIMEOUT
    assert result.attempts == 0
    assert seen == []


class _Breaker:
    def __init__(self, allow: list[bool]) -> None:
        self.allow = allow
        self.records: list[bool] = []
        self.released = 0

    def try_acquire(self) -> _Breaker | None:
        return self if self.allow.pop(0) else None

    def record(self, success: bool, duration: float) -> None:
        self.records.append(success)

    def release(self) -> None:
        self.released += 1

    def retry_after(self) -> float:
        return 4.0


async def test_an_open_breaker_refuses_without_an_attempt() -> None:
    clock = FakeClock()
    attempt, seen = scripted([], clock)
    breaker = _Breaker([False])
    result = await make_pipeline(clock, breaker=breaker).call(
        attempt, Deadline.after(5, clock), retryable=True
    )
    assert result.outcome.kind is Kind.CIRCUIT_OPEN
    assert result.outcome.retry_after == 4.0
    assert seen == []


async def test_every_attempt_is_recorded_by_the_breaker_once() -> None:
    clock = FakeClock()
    breaker = _Breaker([True, True, True])
    attempt, _ = scripted(
        [Outcome(Kind.RESPONSE, 503), Outcome(Kind.TIMEOUT), Outcome(Kind.RESPONSE, 404)], clock
    )
    await make_pipeline(clock, breaker=breaker).call(
        attempt, Deadline.after(5, clock), retryable=True
    )
    assert breaker.records == [False, False, True]  # a 4xx is not a sick upstream


async def test_a_cancelled_attempt_gives_its_breaker_permit_back() -> None:
    clock = FakeClock()
    breaker = _Breaker([True])
    started = asyncio.Event()

    async def hang(number: int, seconds: float) -> Outcome:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    task = asyncio.create_task(
        make_pipeline(clock, breaker=breaker).call(hang, Deadline.after(5, clock), retryable=True)
    )
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.released == 1


class _Bulkhead:
    def __init__(self, free: int) -> None:
        self.free = free

    def try_acquire(self) -> bool:
        if self.free:
            self.free -= 1
            return True
        return False

    async def acquire(self, timeout: float) -> bool:
        return False

    def release(self) -> None:
        self.free += 1


async def test_a_full_bulkhead_refuses_and_a_result_holds_its_slot_until_released() -> None:
    clock = FakeClock()
    bulkhead = _Bulkhead(1)
    pipeline = make_pipeline(clock, bulkhead=bulkhead)
    attempt, _ = scripted([Outcome(Kind.RESPONSE, 200)], clock)
    first = await pipeline.call(attempt, Deadline.after(5, clock), retryable=True)
    second = await pipeline.call(attempt, Deadline.after(5, clock), retryable=True)
    assert second.outcome.kind is Kind.BULKHEAD_FULL
    first.release()
    first.release()  # idempotent
    assert bulkhead.free == 1


class _Budget:
    def __init__(self, retries: int) -> None:
        self.retries = retries
        self.requests = 0

    def record_request(self) -> None:
        self.requests += 1

    def try_spend(self) -> bool:
        if self.retries:
            self.retries -= 1
            return True
        return False


async def test_a_spent_budget_ends_the_call_with_its_last_result() -> None:
    clock = FakeClock()
    hooks = Recorder()
    attempt, _seen = scripted([Outcome(Kind.RESPONSE, 503)] * 3, clock)
    result = await make_pipeline(clock, hooks, budget=_Budget(1)).call(
        attempt, Deadline.after(5, clock), retryable=True
    )
    assert result.attempts == 2
    assert result.outcome.status == 503
    assert ("refused", "status_503", "budget") in hooks.events


async def test_a_call_may_have_acted_when_any_attempt_ended_ambiguously() -> None:
    clock = FakeClock()
    attempt, _ = scripted(
        [Outcome(Kind.RESET), Outcome(Kind.CONNECT_FAILURE), Outcome(Kind.CONNECT_FAILURE)], clock
    )
    result = await make_pipeline(clock).call(attempt, Deadline.after(5, clock), retryable=True)
    assert result.outcome.kind is Kind.CONNECT_FAILURE  # the last attempt alone says "not sent"
    assert result.maybe_acted


async def test_a_call_refused_or_shed_before_acting_did_not_act() -> None:
    clock = FakeClock()
    attempt, _ = scripted([Outcome(Kind.CONNECT_FAILURE), Outcome(Kind.RESPONSE, 503)] * 2, clock)
    result = await make_pipeline(clock).call(attempt, Deadline.after(5, clock), retryable=True)
    assert result.attempts == 3
    assert not result.maybe_acted
