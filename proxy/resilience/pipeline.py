"""The one path every upstream call takes: deadline -> bulkhead -> breaker -> retry -> attempt.

A call that may be hedged (`hedge=True`, an upstream with `Hedging`) runs each
attempt as a race: when it has not answered after the hedge delay, another copy
starts, itself an attempt (a breaker permit, a rate limit token, the hedge and
retry budgets), and the first usable answer wins (`_race`).

The rate limit sits at the attempt level, after the breaker's permit and before
each attempt: a provider's quota counts requests sent, so a retry spends a token
like a first attempt, and an open breaker (which sends nothing) spends none.

Proxied requests and the composite checkout's steps both call `Pipeline.call`
with an `attempt` callable that does the I/O; everything about *whether* and
*when* to make an attempt lives here, built from the pure policies beside this
module. Telemetry is not done here: the pipeline reports events to
`PipelineHooks`, which `proxy.observability` implements.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from proxy.resilience import retry as retry_policy
from proxy.resilience.clock import Clock, monotonic
from proxy.resilience.deadline import Deadline
from proxy.resilience.hedge import Hedging, hedge_due_at
from proxy.resilience.outcome import Kind, Outcome
from proxy.resilience.ratelimit import Admission, RateLimiter
from proxy.resilience.rules import failed_for_caller, may_have_acted, slow_down_for
from proxy.resilience.timers import PerTryTimers

AttemptFn = Callable[[int, float], Awaitable[Outcome]]
"""`attempt(attempt_number, seconds_for_this_attempt)`: one request, classified."""


class PipelineHooks:
    """Events of a call, for metrics, traces and logs. Every method is a no-op here."""

    def attempt_finished(self, upstream: str, number: int, outcome: Outcome) -> None:
        pass

    def retry_scheduled(self, upstream: str, reason: str, delay: float) -> None:
        pass

    def retry_refused(self, upstream: str, reason: str, refused_by: str) -> None:
        pass

    def breaker_transition(self, upstream: str, old: str, new: str) -> None:
        pass

    def request_finished(self, upstream: str, outcome: str, seconds: float) -> None:
        """Once per call, after any fallback: `outcome` is ok, error, timeout,
        circuit_open, bulkhead_full or fallback."""

    def fallback_served(self, upstream: str, reason: str, source: str) -> None:
        pass

    def rate_limited(self, upstream: str, scope: str, admission: Admission) -> None:
        """An attempt the rate limit refused, or let through blind (`store_down`)."""

    def rate_limit_paused(self, upstream: str, seconds: float) -> None:
        """The upstream answered 429 with Retry-After: its bucket pauses `seconds`."""

    def hedge_finished(self, upstream: str, result: str) -> None:
        """A hedge that was due: `won` (its answer was used), `lost` (cancelled or
        not used), or `refused` (not sent: budget, breaker or rate limit said no)."""


class PermitLike(Protocol):
    def record(self, success: bool, duration: float) -> None: ...
    def release(self) -> None: ...


class BreakerLike(Protocol):
    def try_acquire(self) -> PermitLike | None: ...
    def retry_after(self) -> float: ...


class BulkheadLike(Protocol):
    def try_acquire(self) -> bool: ...
    async def acquire(self, timeout: float) -> bool: ...
    def release(self) -> None: ...


class BudgetLike(Protocol):
    def record_request(self) -> None: ...
    def can_spend(self) -> bool: ...
    def try_spend(self) -> bool: ...


@dataclass(slots=True)
class CallResult:
    """The final outcome of a call and how it got there.

    Holds the bulkhead permit until `release()`, so a response whose body is still
    being streamed counts as in flight.
    """

    outcome: Outcome
    attempts: int
    elapsed: float
    exhausted: bool = False  # the last outcome was retryable but no retry was allowed
    maybe_acted: bool = False  # some attempt may have acted upstream without our learning it
    _release: Callable[[], None] | None = None

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    @property
    def reason(self) -> str:
        return self.outcome.reason

    @property
    def failed(self) -> bool:
        """True when the caller did not get a usable answer (no response, or a 5xx)."""
        return failed_for_caller(self.outcome)


_NO_ATTEMPT_YET = Outcome(Kind.TIMEOUT, detail="deadline exceeded before the first attempt")
"""A placeholder for `_attempts`: every way out of its loop sets the real outcome first."""


async def _nothing_to_discard(outcome: Outcome) -> None:
    return None


def _default_failure(outcome: Outcome) -> bool:
    return failed_for_caller(outcome)


class Pipeline:
    """The resilience policies of one upstream, composed in the order of DESIGN.md."""

    def __init__(
        self,
        upstream: str,
        *,
        per_try: float,
        retry: retry_policy.RetryOptions,
        breaker: BreakerLike | None = None,
        bulkhead: BulkheadLike | None = None,
        budget: BudgetLike | None = None,
        limiter: RateLimiter | None = None,
        is_failure: Callable[[Outcome], bool] = _default_failure,
        discard: Callable[[Outcome], Awaitable[None]] = _nothing_to_discard,
        hooks: PipelineHooks | None = None,
        hedging: Hedging | None = None,
        clock: Clock = monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.upstream = upstream
        self.per_try = per_try
        self.retry = retry
        self.breaker = breaker
        self.bulkhead = bulkhead
        self.budget = budget
        self.limiter = limiter
        self.is_failure = is_failure
        self.discard = discard
        self.hooks = hooks or PipelineHooks()
        self.hedging = hedging
        self.clock = clock
        self.sleep = sleep
        self.rng = rng or random.Random()
        self._timers: PerTryTimers | None = None  # made on the first attempt, on its loop

    async def call(
        self, attempt: AttemptFn, deadline: Deadline, *, retryable: bool, hedge: bool = False
    ) -> CallResult:
        """Run `attempt` under every policy; never raises for an upstream failure.

        `retryable`: the request may be sent again after a failure
        (`rules.may_send_twice`); `hedge`: it may also race a copy of itself
        (`rules.may_hedge`), which happens only if this upstream has hedging on.
        """
        started = self.clock()

        release = None
        bulkhead = self.bulkhead
        if bulkhead is not None:
            # the free-slot case without a coroutine; waiting (if queueing is on) with one
            if not (bulkhead.try_acquire() or await bulkhead.acquire(deadline.remaining())):
                return self._finish(Outcome(Kind.BULKHEAD_FULL, detail="bulkhead full"), 0, started)
            release = bulkhead.release
        try:
            hedging = self.hedging if hedge and retryable else None
            result = await self._attempts(attempt, deadline, retryable, started, hedging)
        except BaseException:
            if release is not None:
                release()
            raise
        result._release = release
        return result

    async def _attempts(
        self,
        attempt: AttemptFn,
        deadline: Deadline,
        retryable: bool,
        started: float,
        hedging: Hedging | None = None,
    ) -> CallResult:
        hooks, name, breaker = self.hooks, self.upstream, self.breaker
        number = 0
        superseded: Outcome | None = None  # a retried answer, let go once the retry is certain
        outcome = _NO_ATTEMPT_YET  # replaced before the loop can end
        exhausted = False
        maybe_acted = False
        retrying_for = ""  # the reason of the retry under way, for a refused retry's report
        while True:
            budget_for_try = deadline.cap(self.per_try)
            if budget_for_try <= 0.0:
                if number == 0:
                    outcome = Outcome(Kind.TIMEOUT, detail="deadline exceeded")
                exhausted = number > 0
                break
            permit = None if breaker is None else breaker.try_acquire()
            if breaker is not None and permit is None:
                if number == 0:
                    outcome = Outcome(
                        Kind.CIRCUIT_OPEN,
                        retry_after=breaker.retry_after(),
                        detail="circuit breaker is open",
                    )
                else:
                    exhausted = True
                break
            if self.limiter is not None:
                refusal = await self._token(deadline, permit)
                if refusal is not None:
                    if number == 0:
                        outcome = refusal
                    else:
                        exhausted = True
                        hooks.retry_refused(name, retrying_for, "rate_limit")
                    break
                budget_for_try = deadline.cap(self.per_try)  # the wait took some of it
            if superseded is not None:
                await self.discard(superseded)
                superseded = None
            elif number == 0:
                # refused calls earn no retry (or hedge) allowance
                if self.budget is not None:
                    self.budget.record_request()
                if hedging is not None:
                    hedging.budget.record_request()
            number += 1
            if hedging is None:
                outcome = await self._one_attempt(attempt, number, budget_for_try, deadline, permit)
                if permit is not None:
                    permit.record(not self.is_failure(outcome), outcome.elapsed)
                hooks.attempt_finished(name, number, outcome)
                if self.hedging is not None and not failed_for_caller(outcome):
                    self.hedging.record_latency(outcome.elapsed)  # the p95 is of every call
            else:
                outcome, number, acted = await self._race(
                    attempt, number, budget_for_try, deadline, permit, hedging
                )
                if acted:
                    maybe_acted = True
            if self.limiter is not None:
                pause = slow_down_for(outcome)
                if pause:
                    hooks.rate_limit_paused(name, pause)
                    await self.limiter.pause(pause)
            if (
                outcome.kind is Kind.RESPONSE
                and outcome.status < 500
                and outcome.status not in self.retry.statuses
            ):
                break  # the usual answer: acted as we know, retried on no policy's word
            if not maybe_acted and may_have_acted(outcome):
                maybe_acted = True

            decision = retry_policy.decide(
                outcome, number, deadline.remaining(), self.retry, retryable, self.rng
            )
            if not decision.retry:
                if decision.reason:
                    exhausted = True
                    if decision.refused_by != "request":
                        hooks.retry_refused(name, decision.reason, decision.refused_by)
                break
            if self.budget is not None and not self.budget.try_spend():
                exhausted = True
                hooks.retry_refused(name, decision.reason, "budget")
                break
            superseded = outcome
            retrying_for = decision.reason
            hooks.retry_scheduled(name, decision.reason, decision.delay)
            try:
                await self.sleep(decision.delay)
            except BaseException:
                await self.discard(superseded)
                raise
        result = self._finish(outcome, number, started, exhausted)
        result.maybe_acted = maybe_acted
        return result

    async def _race(
        self,
        attempt: AttemptFn,
        number: int,
        budget_for_try: float,
        deadline: Deadline,
        permit: PermitLike | None,
        hedging: Hedging,
    ) -> tuple[Outcome, int, bool]:
        """Attempt `number`, hedged: `(outcome, last attempt number, maybe_acted)`.

        Each copy runs `_one_attempt` in its own task, with its own per-try timer,
        permit and report. The first usable answer (a response below 500) wins and
        the rest are cancelled: a cancelled aiohttp request closes its connection,
        and an answer that lost is let go (`discard`), which closes an unread one.
        A failure (a connect failure, a reset, a 5xx, a per-try timeout) ends only
        its own copy while another may still answer; when every copy failed, the
        race's outcome is a response if there was one (the upstream's own word),
        else the last failure, and the retry policy takes it from there.
        `maybe_acted` is set by a failed copy that may have acted; a copy cancelled
        after another answered needs no such note, the answer speaks for the key.
        """
        loop = asyncio.get_running_loop()
        name, hooks = self.upstream, self.hooks
        delay = hedging.delay()
        max_extra = hedging.options.max_extra
        begun = loop.time()
        racing: dict[asyncio.Task[Outcome], tuple[int, PermitLike | None, float, bool]] = {}

        def start(n: int, seconds: float, slot: PermitLike | None, is_hedge: bool) -> None:
            task = loop.create_task(self._one_attempt(attempt, n, seconds, deadline, slot))
            racing[task] = (n, slot, loop.time(), is_hedge)

        start(number, budget_for_try, permit, False)
        due = 0  # hedges that came due (sent or refused)
        failures: list[Outcome] = []
        winner: Outcome | None = None
        maybe_acted = False
        try:
            while racing and winner is None:
                wait: float | None = None
                if due < max_extra:
                    wait = max(0.0, hedge_due_at(begun, delay, due) - loop.time())
                done, _ = await asyncio.wait(
                    racing, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    due += 1
                    seconds = deadline.cap(self.per_try)
                    if seconds <= 0.0:
                        due = max_extra  # no time left for another copy
                        continue
                    granted = await self._hedge_permit(hedging)
                    if granted is False:
                        hooks.hedge_finished(name, "refused")
                        continue
                    number += 1
                    slot = None if granted is True else granted
                    start(number, deadline.cap(self.per_try), slot, True)
                    continue
                for task in done:
                    n, finished_slot, _began, is_hedge = racing.pop(task)
                    outcome = task.result()
                    self._report(n, finished_slot, outcome, hedging)
                    if winner is None and not failed_for_caller(outcome):
                        winner = outcome
                        if is_hedge:
                            hooks.hedge_finished(name, "won")
                        continue
                    if is_hedge:
                        hooks.hedge_finished(name, "lost")
                    if winner is not None:
                        await self.discard(outcome)
                    else:
                        failures.append(outcome)
                        if may_have_acted(outcome):
                            maybe_acted = True
        except BaseException:
            await self._cancel_losers(racing, hedging)
            for lost in [*failures, *([winner] if winner is not None else [])]:
                await self.discard(lost)
            raise
        await self._cancel_losers(racing, hedging)
        if winner is not None:
            for lost in failures:
                await self.discard(lost)
            return winner, number, False
        final = next((o for o in reversed(failures) if o.kind is Kind.RESPONSE), failures[-1])
        for lost in failures:
            if lost is not final:
                await self.discard(lost)
        return final, number, maybe_acted

    def _report(
        self, number: int, permit: PermitLike | None, outcome: Outcome, hedging: Hedging
    ) -> None:
        """A copy in a race finished: its permit's record, its event, its latency."""
        if permit is not None:
            permit.record(not self.is_failure(outcome), outcome.elapsed)
        self.hooks.attempt_finished(self.upstream, number, outcome)
        if not failed_for_caller(outcome):
            hedging.record_latency(outcome.elapsed)

    async def _cancel_losers(
        self,
        racing: dict[asyncio.Task[Outcome], tuple[int, PermitLike | None, float, bool]],
        hedging: Hedging,
    ) -> None:
        """Cancel the copies still running; let go of any that answered meanwhile.

        Awaited, so each cancelled request has closed its connection (not returned
        it to the pool) before the call goes on. A cancelled copy's permit is given
        back unrecorded (`_one_attempt`), since its outcome is unknown; its time so
        far goes into the latency window as a lower bound, or the slow tail the
        quantile is for would never be seen.
        """
        if not racing:
            return
        loop = asyncio.get_running_loop()
        for task in racing:
            task.cancel()
        await asyncio.gather(*racing, return_exceptions=True)
        for task, (n, slot, began, is_hedge) in racing.items():
            if is_hedge:
                self.hooks.hedge_finished(self.upstream, "lost")
            if task.cancelled():
                hedging.record_latency(loop.time() - began)
                continue
            error = task.exception()
            if error is not None:
                continue  # the attempt raised (a bug): its permit went back in _one_attempt
            outcome = task.result()
            self._report(n, slot, outcome, hedging)
            await self.discard(outcome)
        racing.clear()

    async def _hedge_permit(self, hedging: Hedging) -> PermitLike | bool:
        """What a due hedge may be sent with: a breaker permit (True without a
        breaker), or False when a budget, the breaker or the rate limit says no.

        Both budgets and the breaker are asked before anything is spent; the rate
        limit only grants a token at hand (a hedge that must wait is late anyway).
        """
        retry_budget = self.budget
        if not hedging.budget.can_spend() or (
            retry_budget is not None and not retry_budget.can_spend()
        ):
            return False
        permit: PermitLike | None = None
        if self.breaker is not None:
            permit = self.breaker.try_acquire()
            if permit is None:
                return False
        if self.limiter is not None:
            try:
                admission = await self.limiter.acquire(0.0)
            except BaseException:
                if permit is not None:
                    permit.release()
                raise
            if admission.store_down:
                self.hooks.rate_limited(self.upstream, self.limiter.options.scope, admission)
            if not admission.granted or admission.wait > 0.0:
                if permit is not None:
                    permit.release()
                return False
        # awaits above may have let another call spend: spend now, or give all back
        if not hedging.budget.try_spend() or (
            retry_budget is not None and not retry_budget.try_spend()
        ):
            if permit is not None:
                permit.release()
            return False
        return permit if permit is not None else True

    async def _token(self, deadline: Deadline, permit: PermitLike | None) -> Outcome | None:
        """Wait for the rate limit's token; the refusal's outcome when none comes in time.

        A token is taken only when the wait leaves time for the attempt after it
        (`Deadline.allows_wait`); a refusal gives the breaker's permit back unused.
        """
        limiter = self.limiter
        assert limiter is not None
        try:
            admission = await limiter.acquire(deadline.remaining())
            if admission.granted:
                if admission.store_down:  # `on_store_down: allow`: let through blind
                    self.hooks.rate_limited(self.upstream, limiter.options.scope, admission)
                if admission.wait > 0.0:
                    await self.sleep(admission.wait)
        except BaseException:
            if permit is not None:
                permit.release()
            raise
        if admission.granted and deadline.remaining() > 0.0:
            return None
        if permit is not None:
            permit.release()
        if admission.granted:  # the sleep overshot a deadline it was shorter than
            return Outcome(Kind.TIMEOUT, detail="deadline exceeded waiting for a rate limit token")
        self.hooks.rate_limited(self.upstream, limiter.options.scope, admission)
        kind = Kind.STORE_UNAVAILABLE if admission.store_down else Kind.RATE_LIMITED
        return Outcome(kind, retry_after=admission.retry_after or None, detail=admission.detail)

    async def _one_attempt(
        self,
        attempt: AttemptFn,
        number: int,
        budget_for_try: float,
        deadline: Deadline,
        permit: PermitLike | None,
    ) -> Outcome:
        """One attempt bounded by `budget_for_try`; running out of it is a TIMEOUT outcome.

        What `asyncio.timeout` does, with no context manager and no loop timer of its
        own (`PerTryTimers`: one loop timer for all of this pipeline's attempts):
        when the timer fires it cancels this task, and the cancellation is turned
        into a timeout here, unless someone else cancelled the task too, in which
        case it propagates (`Task.uncancel` keeps the count, as in asyncio.timeout).
        """
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Pipeline.call must run inside a task")
        cancelling = task.cancelling()
        timers = self._timers
        if timers is None or timers.loop is not task.get_loop():
            timers = self._timers = PerTryTimers(task.get_loop())
        # the time from a fresh loop.time(), like asyncio.timeout: uvloop's call_later
        # counts from the time cached at the start of the loop iteration, a bit early
        timer = timers.start(timers.loop.time() + budget_for_try, task)
        began = self.clock()
        try:
            outcome = await attempt(number, budget_for_try)
        except (asyncio.CancelledError, TimeoutError) as exc:
            ours = timers.stop(timer) and task.uncancel() <= cancelling
            if isinstance(exc, asyncio.CancelledError) and not ours:
                if permit is not None:
                    permit.release()  # a cancelled attempt must not hold a half-open probe slot
                raise
            which = "deadline" if deadline.expired else "per-try timeout"
            outcome = Outcome(
                Kind.TIMEOUT, detail=f"no response within {budget_for_try * 1000:.0f} ms ({which})"
            )
        except BaseException:
            if timers.stop(timer):
                task.uncancel()
            if permit is not None:
                permit.release()
            raise
        else:
            if timers.stop(timer):  # fired, but the attempt finished anyway: take our cancel back
                task.uncancel()
        outcome.elapsed = self.clock() - began
        return outcome

    def _finish(
        self, outcome: Outcome, attempts: int, started: float, exhausted: bool = False
    ) -> CallResult:
        return CallResult(outcome, attempts, self.clock() - started, exhausted)
