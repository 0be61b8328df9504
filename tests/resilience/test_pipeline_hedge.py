"""The pipeline's hedged race, with scripted attempts that answer when told to.

The hedge delay is a few milliseconds of real loop time (the race waits on the
event loop); what is asserted is the order of events, never a duration.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.resilience.backoff import BackoffOptions
from proxy.resilience.breaker import Breaker, BreakerOptions
from proxy.resilience.budget import BudgetOptions, RetryBudget
from proxy.resilience.clock import FakeClock
from proxy.resilience.deadline import Deadline
from proxy.resilience.hedge import HedgeOptions, Hedging
from proxy.resilience.outcome import Kind, Outcome
from proxy.resilience.pipeline import Pipeline, PipelineHooks
from proxy.resilience.ratelimit import LocalLimiter, RateLimitOptions
from proxy.resilience.retry import RetryOptions

RETRY = RetryOptions(attempts=1, backoff=BackoffOptions(0.001, 2, 0.002, "none"))
AFTER = 0.005
GENEROUS = BudgetOptions(ratio=1.0, min_per_second=100.0, window=10.0)


class Recorder(PipelineHooks):
    def __init__(self) -> None:
        self.hedges: list[str] = []
        self.attempts: list[tuple[int, str]] = []

    def attempt_finished(self, upstream: str, number: int, outcome: Outcome) -> None:
        self.attempts.append((number, outcome.reason))

    def hedge_finished(self, upstream: str, result: str) -> None:
        self.hedges.append(result)


@dataclass
class Script:
    """Attempt `n` answers `answers[n]` once `gates[n]` is set (at once without a gate)."""

    answers: dict[int, Outcome]
    gates: dict[int, asyncio.Event] = field(default_factory=dict)
    started: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)

    async def attempt(self, number: int, seconds: float) -> Outcome:
        self.started.append(number)
        gate = self.gates.get(number)
        try:
            if gate is not None:
                await gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(number)
            raise
        return self.answers[number]


async def until(condition: Callable[[], bool]) -> None:
    """Wait, a millisecond at a time, until `condition` holds (at most 5 s)."""
    for _ in range(5000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")


def never() -> asyncio.Event:
    return asyncio.Event()


def hedging(clock: FakeClock, **kw: object) -> Hedging:
    kw.setdefault("after", AFTER)
    kw.setdefault("budget", GENEROUS)
    return Hedging(HedgeOptions(**kw), clock)  # type: ignore[arg-type]


def pipeline(
    clock: FakeClock, hooks: PipelineHooks, hedge: Hedging | None, **kw: object
) -> tuple[Pipeline, list[Outcome]]:
    discarded: list[Outcome] = []

    async def discard(outcome: Outcome) -> None:
        discarded.append(outcome)

    kw.setdefault("retry", RETRY)
    kw.setdefault("budget", RetryBudget(GENEROUS, clock))
    built = Pipeline(
        "catalog",
        per_try=1.0,
        hooks=hooks,
        hedging=hedge,
        discard=discard,
        clock=clock,
        **kw,  # type: ignore[arg-type]
    )
    return built, discarded


def ok(status: int = 200) -> Outcome:
    return Outcome(Kind.RESPONSE, status)


async def test_a_slow_first_attempt_is_raced_and_the_hedge_wins() -> None:
    clock, hooks = FakeClock(), Recorder()
    script = Script({1: ok(), 2: ok(201)}, gates={1: never()})
    run, _ = pipeline(clock, hooks, hedging(clock))
    result = await run.call(script.attempt, Deadline.after(5, clock), retryable=True, hedge=True)
    assert result.outcome.status == 201
    assert result.attempts == 2
    assert script.cancelled == [1]  # the loser was cancelled, not left running
    assert hooks.hedges == ["won"]
    assert hooks.attempts == [(2, "ok")]  # the cancelled attempt's outcome is unknown


async def test_a_first_attempt_that_answers_in_time_is_not_hedged() -> None:
    clock, hooks = FakeClock(), Recorder()
    script = Script({1: ok()})
    run, _ = pipeline(clock, hooks, hedging(clock))
    result = await run.call(script.attempt, Deadline.after(5, clock), retryable=True, hedge=True)
    assert result.attempts == 1 and script.started == [1]
    assert hooks.hedges == []


async def test_the_first_attempt_wins_and_the_hedge_is_cancelled() -> None:
    clock, hooks = FakeClock(), Recorder()
    first = asyncio.Event()
    script = Script({1: ok(), 2: ok(201)}, gates={1: first, 2: never()})
    run, _ = pipeline(clock, hooks, hedging(clock))

    async def answer_after_the_hedge_started() -> None:
        await until(lambda: 2 in script.started)
        first.set()

    helper = asyncio.ensure_future(answer_after_the_hedge_started())
    result = await run.call(script.attempt, Deadline.after(5, clock), retryable=True, hedge=True)
    await helper
    assert result.outcome.status == 200
    assert script.cancelled == [2]
    assert hooks.hedges == ["lost"]


async def test_a_call_that_may_not_be_hedged_waits_for_its_one_attempt() -> None:
    clock, hooks = FakeClock(), Recorder()
    first = asyncio.Event()
    script = Script({1: ok()}, gates={1: first})
    run, _ = pipeline(clock, hooks, hedging(clock))
    asyncio.get_running_loop().call_later(AFTER * 6, first.set)
    result = await run.call(script.attempt, Deadline.after(5, clock), retryable=True, hedge=False)
    assert result.attempts == 1 and script.started == [1]
    assert hooks.hedges == []


async def test_a_request_that_cannot_be_resent_is_never_hedged() -> None:
    clock, hooks = FakeClock(), Recorder()
    first = asyncio.Event()
    script = Script({1: ok()}, gates={1: first})
    run, _ = pipeline(clock, hooks, hedging(clock))
    asyncio.get_running_loop().call_later(AFTER * 6, first.set)
    result = await run.call(script.attempt, Deadline.after(5, clock), retryable=False, hedge=True)
    assert script.started == [1] and result.attempts == 1


async def test_a_failed_hedge_does_not_end_the_call_while_the_first_may_answer() -> None:
    clock, hooks = FakeClock(), Recorder()
    first = asyncio.Event()
    script = Script({1: ok(), 2: Outcome(Kind.CONNECT_FAILURE, detail="refused")}, gates={1: first})
    run, discarded = pipeline(clock, hooks, hedging(clock))

    async def answer_after_the_hedge_failed() -> None:
        await until(lambda: (2, "connect_failure") in hooks.attempts)
        first.set()

    helper = asyncio.ensure_future(answer_after_the_hedge_failed())
    result = await run.call(script.attempt, Deadline.after(5, clock), retryable=True, hedge=True)
    await helper
    assert result.outcome.status == 200
    assert hooks.hedges == ["lost"]
    assert [o.kind for o in discarded] == [Kind.CONNECT_FAILURE]


async def test_a_failed_first_attempt_leaves_the_hedge_to_answer() -> None:
    clock, hooks = FakeClock(), Recorder()
    first, second = asyncio.Event(), asyncio.Event()
    script = Script({1: Outcome(Kind.RESPONSE, 502), 2: ok(201)}, gates={1: first, 2: second})
    run, discarded = pipeline(clock, hooks, hedging(clock))

    async def fail_first_then_answer() -> None:
        await until(lambda: 2 in script.started)
        first.set()
        await until(lambda: (1, "upstream_5xx") in hooks.attempts)
        second.set()

    helper = asyncio.ensure_future(fail_first_then_answer())
    result = await run.call(script.attempt, Deadline.after(5, clock), retryable=True, hedge=True)
    await helper
    assert result.outcome.status == 201
    assert hooks.hedges == ["won"]
    assert [o.status for o in discarded] == [502]  # the 5xx that lost is let go


async def test_when_every_copy_fails_the_upstreams_own_answer_is_kept() -> None:
    clock, hooks = FakeClock(), Recorder()
    first = asyncio.Event()
    script = Script(
        {1: Outcome(Kind.RESPONSE, 503), 2: Outcome(Kind.RESET, detail="reset")},
        gates={1: first},
    )
    run, discarded = pipeline(clock, hooks, hedging(clock))

    async def fail_first_after_the_hedge() -> None:
        await until(lambda: (2, "reset") in hooks.attempts)
        first.set()

    helper = asyncio.ensure_future(fail_first_after_the_hedge())
    result = await run.call(script.attempt, Deadline.after(5, clock), retryable=True, hedge=True)
    await helper
    assert result.outcome.status == 503
    assert result.maybe_acted  # the reset may have acted
    assert [o.kind for o in discarded] == [Kind.RESET]
    assert hooks.hedges == ["lost"]


async def test_a_hedge_the_budget_refuses_is_not_sent() -> None:
    clock, hooks = FakeClock(), Recorder()
    first = asyncio.Event()
    script = Script({1: ok()}, gates={1: first})
    spent = BudgetOptions(ratio=0.0, min_per_second=0.0, window=10.0)
    run, _ = pipeline(clock, hooks, hedging(clock, budget=spent))
    asyncio.get_running_loop().call_later(AFTER * 6, first.set)
    result = await run.call(script.attempt, Deadline.after(5, clock), retryable=True, hedge=True)
    assert script.started == [1] and result.attempts == 1
    assert hooks.hedges == ["refused"]


async def test_a_hedge_spends_the_retry_budget_too() -> None:
    clock, hooks = FakeClock(), Recorder()
    retry_budget = RetryBudget(BudgetOptions(ratio=0.0, min_per_second=0.1, window=10.0), clock)
    script = Script({1: ok(), 2: ok()}, gates={1: never()})
    run, _ = pipeline(clock, hooks, hedging(clock), budget=retry_budget)
    await run.call(script.attempt, Deadline.after(5, clock), retryable=True, hedge=True)
    assert hooks.hedges == ["won"]
    assert not retry_budget.can_spend()  # its one retry went to the hedge

    first = asyncio.Event()
    again = Script({1: ok()}, gates={1: first})
    asyncio.get_running_loop().call_later(AFTER * 6, first.set)
    await run.call(again.attempt, Deadline.after(5, clock), retryable=True, hedge=True)
    assert again.started == [1]
    assert hooks.hedges == ["won", "refused"]


async def test_a_hedge_takes_a_breaker_permit_and_reports_to_it() -> None:
    clock, hooks = FakeClock(), Recorder()
    breaker = Breaker(BreakerOptions(window=10.0, min_calls=100), clock)
    script = Script({1: ok(), 2: ok()}, gates={1: never()})
    run, _ = pipeline(clock, hooks, hedging(clock), breaker=breaker)
    await run.call(script.attempt, Deadline.after(5, clock), retryable=True, hedge=True)
    assert hooks.hedges == ["won"]
    assert breaker.snapshot()["calls_in_window"] == 1  # the hedge's; the cancelled one gave back


async def test_an_open_breaker_refuses_the_hedge() -> None:
    clock, hooks = FakeClock(), Recorder()
    breaker = Breaker(BreakerOptions(window=10.0, min_calls=1, half_open_probes=1), clock)
    first = asyncio.Event()
    script = Script({1: ok()}, gates={1: first})
    run, _ = pipeline(clock, hooks, hedging(clock), breaker=breaker)

    async def open_the_breaker_meanwhile() -> None:
        await until(lambda: 1 in script.started)
        breaker.force_open()
        await until(lambda: "refused" in hooks.hedges)
        first.set()

    helper = asyncio.ensure_future(open_the_breaker_meanwhile())
    await run.call(script.attempt, Deadline.after(5, clock), retryable=True, hedge=True)
    await helper
    assert script.started == [1]
    assert hooks.hedges == ["refused"]


async def test_a_hedge_without_a_rate_limit_token_is_not_sent() -> None:
    clock, hooks = FakeClock(), Recorder()
    limiter = LocalLimiter(RateLimitOptions(rate=1.0, burst=1), clock)
    first = asyncio.Event()
    script = Script({1: ok()}, gates={1: first})
    run, _ = pipeline(clock, hooks, hedging(clock), limiter=limiter)
    asyncio.get_running_loop().call_later(AFTER * 6, first.set)
    result = await run.call(script.attempt, Deadline.after(5, clock), retryable=True, hedge=True)
    assert script.started == [1] and result.attempts == 1
    assert hooks.hedges == ["refused"]  # the first attempt took the one token


async def test_max_extra_bounds_the_copies_in_a_race() -> None:
    clock, hooks = FakeClock(), Recorder()
    script = Script({1: ok(), 2: ok(), 3: ok(203)}, gates={1: never(), 2: never()})
    run, _ = pipeline(clock, hooks, hedging(clock, max_extra=2))
    result = await run.call(script.attempt, Deadline.after(5, clock), retryable=True, hedge=True)
    assert result.outcome.status == 203
    assert sorted(script.cancelled) == [1, 2]
    assert sorted(hooks.hedges) == ["lost", "won"]


async def test_a_cancelled_call_cancels_every_copy() -> None:
    clock, hooks = FakeClock(), Recorder()
    script = Script({1: ok(), 2: ok()}, gates={1: never(), 2: never()})
    run, _ = pipeline(clock, hooks, hedging(clock))
    task = asyncio.ensure_future(
        run.call(script.attempt, Deadline.after(5, clock), retryable=True, hedge=True)
    )
    await until(lambda: 2 in script.started)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert sorted(script.cancelled) == [1, 2]
    assert hooks.hedges == ["lost"]


async def test_answers_and_cancelled_copies_feed_the_latency_window() -> None:
    clock, hooks = FakeClock(), Recorder()
    state = hedging(clock)
    script = Script({1: ok(), 2: ok()}, gates={1: never()})
    run, _ = pipeline(clock, hooks, state)
    await run.call(script.attempt, Deadline.after(5, clock), retryable=True, hedge=True)
    assert state.latency.count() == 2  # the hedge's answer, and the loser as a lower bound
