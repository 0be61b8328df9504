"""Circuit breaker: stop calling an upstream that is failing, then probe it back.

Modelled on Polly v8 (`CircuitStateController`, `RollingHealthMetrics`): options are
plain data, `Breaker` is the state machine, time comes from an injected clock and
telemetry leaves through one `on_transition` hook. Nothing here sleeps or does I/O,
so every behaviour is tested by advancing a `FakeClock`.

States:

- ``closed``: calls go through; outcomes land in a sliding time window. Once the
  window holds at least `min_calls` calls and the failure rate (or the slow-call
  rate) reaches its threshold, the breaker opens.
- ``open``: calls are refused without touching the network until `open_until`.
- ``half_open``: at most `half_open_probes` trial calls are let through. One failure
  opens the breaker again; `half_open_probes` successes close it with a fresh window.

Every call that was let through must be settled exactly once: `record()` when it
ran, `release()` when it never did (cancelled, refused by a later layer). A permit
that is never settled would hold a half-open probe slot forever, so the pipeline
should use `try_acquire()` and settle the returned `Permit` in a ``finally``:
settling a permit twice is a no-op, and a permit from an earlier state (a call that
started while closed and ends after the breaker re-opened) cannot touch the probe
accounting of the current half-open period.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from proxy.resilience.clock import Clock, monotonic
from proxy.resilience.outcome import RESPONSE, Kind, Outcome

State = Literal["closed", "open", "half_open"]
Forced = Literal["open", "closed"]
TransitionHook = Callable[[str, str], None]

CLOSED: State = "closed"
OPEN: State = "open"
HALF_OPEN: State = "half_open"

DEFAULT_FAILURE_STATUSES: frozenset[int] = frozenset(range(500, 600))
"""Every 5xx counts against the upstream; a 4xx is the caller's fault, not the upstream's."""

_FAILURE_KINDS = frozenset(
    {
        Kind.TIMEOUT,
        Kind.CONNECT_FAILURE,
        Kind.RESET,
        Kind.TLS_VERIFY_FAILED,
        Kind.TLS_HANDSHAKE_FAILED,
    }
)
_CALLS = 0  # the fields of the breaker's window: calls, failures, slow calls


def is_failure(
    outcome: Outcome, failure_statuses: frozenset[int] = DEFAULT_FAILURE_STATUSES
) -> bool:
    """Whether an attempt's outcome counts against the upstream's health.

    Timeouts, connect failures (a failed TLS handshake among them) and resets say the
    upstream (or the path to it) is unwell. A response counts only when its status is
    in `failure_statuses`, so a storm of 404s or 422s from bad requests never opens the
    breaker. Refusals by the sidecar itself (open breaker, full bulkhead, rate limit)
    made no call and are not failures; they should not be recorded at all. An
    upstream's 429 is not one either: it is the rate limit's business (it pauses the
    bucket), not a sign of ill health.
    """
    if outcome.kind is RESPONSE:
        return outcome.status in failure_statuses
    return outcome.kind in _FAILURE_KINDS


@dataclass(frozen=True, slots=True)
class BreakerOptions:
    """Breaker settings for one upstream; plain data so a reload can compare them.

    `window` seconds are split into `buckets` slices; the oldest slice drops out as
    time moves, so the rates describe roughly the last `window` seconds.
    `slow_call_duration` (seconds) turns the slow-call rule on: a call at least that
    slow is slow, and the breaker opens when `slow_call_rate` of the window is slow.
    """

    enabled: bool = True
    window: float = 10.0
    buckets: int = 10
    min_calls: int = 20
    failure_rate: float = 0.5
    slow_call_duration: float | None = None
    slow_call_rate: float = 1.0
    open_for: float = 5.0
    half_open_probes: int = 3

    def __post_init__(self) -> None:
        if not self.window > 0:
            raise ValueError(f"window must be > 0 seconds, got {self.window!r}")
        if self.buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {self.buckets!r}")
        if self.min_calls < 1:
            raise ValueError(f"min_calls must be >= 1, got {self.min_calls!r}")
        if not 0.0 < self.failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be in (0, 1], got {self.failure_rate!r}")
        if self.slow_call_duration is not None and not self.slow_call_duration > 0:
            raise ValueError(
                f"slow_call_duration must be > 0 seconds, got {self.slow_call_duration!r}"
            )
        if not 0.0 < self.slow_call_rate <= 1.0:
            raise ValueError(f"slow_call_rate must be in (0, 1], got {self.slow_call_rate!r}")
        if self.open_for < 0:
            raise ValueError(f"open_for must be >= 0 seconds, got {self.open_for!r}")
        if self.half_open_probes < 1:
            raise ValueError(f"half_open_probes must be >= 1, got {self.half_open_probes!r}")


class RollingCounts:
    """Integer counters summed over a sliding time window, O(1) per update.

    The window is a ring of `buckets` slices of `window / buckets` seconds each, plus
    running totals. Moving time forward clears the slices that fell out of the window
    (at most `buckets` of them, however long the gap), so neither `add` nor `totals`
    walks the whole history. Shared by the breaker and the retry budget.
    """

    def __init__(self, window: float, buckets: int, fields: int, clock: Clock) -> None:
        self._width = window / buckets
        self._buckets = buckets
        self._fields = fields
        self._clock = clock
        self._ring = [[0] * fields for _ in range(buckets)]
        self._totals = [0] * fields
        self._head: int | None = None  # index of the slice "now" falls in
        self._current = self._ring[0]  # the ring's slice for `_head`

    def add(self, *deltas: int) -> None:
        """Add `deltas` (one per field) to the current slice."""
        self._rotate()
        bucket, totals = self._current, self._totals
        for i, delta in enumerate(deltas):
            bucket[i] += delta
            totals[i] += delta

    def increment(self, field: int) -> list[int]:
        """Add one to `field` of the current slice: `add` for the common single count.

        Returns the running totals as of now (read only): a caller that adds and then
        looks saves moving the window twice.
        """
        self._rotate()
        self._current[field] += 1
        totals = self._totals
        totals[field] += 1
        return totals

    def totals(self) -> tuple[int, ...]:
        """Each field summed over the window as of now."""
        self._rotate()
        return tuple(self._totals)

    def clear(self) -> None:
        """Forget everything, e.g. when a breaker closes and starts a fresh window."""
        for bucket in self._ring:
            bucket[:] = [0] * self._fields
        self._totals = [0] * self._fields
        self._head = None

    def _rotate(self) -> None:
        now_slice = math.floor(self._clock() / self._width)
        head = self._head
        if now_slice == head:
            return  # still inside the current slice: the usual case, nothing to move
        if head is None or now_slice - head >= self._buckets:
            if head is not None:
                self.clear()
            self._head = now_slice
            self._current = self._ring[now_slice % self._buckets]
            return
        # A clock never runs backwards; if one does, keep writing to the newest slice.
        for index in range(head + 1, now_slice + 1):
            bucket = self._ring[index % self._buckets]
            for i, count in enumerate(bucket):
                self._totals[i] -= count
                bucket[i] = 0
        if now_slice > head:
            self._head = now_slice
            self._current = self._ring[now_slice % self._buckets]


class Permit:
    """The right to make one call, handed out by `Breaker.try_acquire()`.

    Settle it exactly once with `record()` or `release()`; later settlements are
    ignored, so ``finally: permit.release()`` after a `record()` is safe. The permit
    remembers which breaker state it was issued in, so a call that outlives that state
    cannot be mistaken for a half-open probe.
    """

    __slots__ = ("_breaker", "_episode", "_settled")

    def __init__(self, breaker: Breaker, episode: int) -> None:
        self._breaker = breaker
        self._episode = episode
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    def record(self, success: bool, duration: float) -> None:
        """The call ran: `success` per `is_failure`, `duration` in seconds."""
        if not self._settled:
            self._settled = True
            self._breaker._settle(self._episode, success, duration)

    def release(self) -> None:
        """The call never ran (cancelled, refused further down): free the slot."""
        if not self._settled:
            self._settled = True
            self._breaker._settle(self._episode, None, 0.0)


class Breaker:
    """The breaker of one upstream: a state machine over a sliding health window.

    `on_transition(old, new)` is called after every state change, for metrics and
    logs; it runs synchronously and should not raise.
    """

    def __init__(
        self,
        options: BreakerOptions | None = None,
        clock: Clock = monotonic,
        on_transition: TransitionHook | None = None,
    ) -> None:
        self.options = options if options is not None else BreakerOptions()
        self._clock = clock
        self._on_transition = on_transition
        self._window = RollingCounts(self.options.window, self.options.buckets, 3, clock)
        self._state: State = CLOSED
        self._forced: Forced | None = None
        self._open_until = 0.0
        self._episode = 0  # bumped on every transition; permits carry it
        self._probes_issued = 0  # half-open permits handed out and not released
        self._probes_succeeded = 0

    # -- the call path -------------------------------------------------------------

    def try_acquire(self) -> Permit | None:
        """A permit for one call now, or None when the call must be refused.

        Closed: always. Open: never, until `open_until` passes, which moves the
        breaker to half-open. Half-open: while fewer than `half_open_probes` probe
        permits are out or have succeeded; released permits give their slot back.
        """
        if self._forced == "open":
            return None
        if self._forced == "closed" or not self.options.enabled:
            return Permit(self, self._episode)
        self._refresh()
        if self._state == CLOSED:
            return Permit(self, self._episode)
        if self._state == HALF_OPEN and self._probes_issued < self.options.half_open_probes:
            self._probes_issued += 1
            return Permit(self, self._episode)
        return None

    def acquire(self) -> bool:
        """May a call go through now? Settle a True with `record()` or `release()`.

        The bool form cannot tell which state the call started in, so its settlements
        are attributed to the current state; prefer `try_acquire()` in the pipeline.
        """
        return self.try_acquire() is not None

    def record(self, success: bool, duration: float) -> None:
        """Settle a call let through by `acquire()` that ran (see `Permit.record`)."""
        self._settle(None, success, duration)

    def release(self) -> None:
        """Settle a call let through by `acquire()` that never ran (see `Permit.release`).

        Without it a cancelled half-open probe would hold its slot and the breaker
        could never collect enough probe results to close.
        """
        self._settle(None, None, 0.0)

    # -- manual control (admin endpoint) ---------------------------------------------

    def force_open(self) -> None:
        """Isolate the upstream: refuse every call until `reset()`."""
        self._forced = "open"
        self._open_until = math.inf
        self._transition(OPEN)

    def force_closed(self) -> None:
        """Let every call through until `reset()`, whatever the window says."""
        self._forced = "closed"
        self._transition(CLOSED)

    def reset(self) -> None:
        """Back to closed with an empty window and no manual override."""
        self._forced = None
        self._window.clear()
        self._transition(CLOSED)

    # -- reading -------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The current state; an expired open period reads (and becomes) half-open."""
        self._refresh()
        return self._state

    @property
    def forced(self) -> Forced | None:
        return self._forced

    @property
    def open_until(self) -> float:
        """Clock time at which an open breaker starts probing; inf when forced open."""
        return self._open_until

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a probe through; 0 when not open.

        Forced open has no end, so the hint is `open_for`, a sensible Retry-After.
        """
        self._refresh()
        if self._state == HALF_OPEN:
            # refused only because every probe slot is taken: the probes will tell soon
            return 1.0 if self._probes_issued >= self.options.half_open_probes else 0.0
        if self._state != OPEN:
            return 0.0
        if self._forced == "open":
            return self.options.open_for
        return max(0.0, self._open_until - self._clock())

    @property
    def failure_rate(self) -> float:
        """Failure share of the attempts in the window (0 when it is empty)."""
        calls, failures, _ = self._window.totals()
        return failures / calls if calls else 0.0

    def snapshot(self) -> dict[str, object]:
        """A JSON-ready view for `/admin/breakers`."""
        calls, failures, slow = self._window.totals()
        state = self.state
        return {
            "state": state,
            "failure_rate": failures / calls if calls else 0.0,
            "slow_rate": slow / calls if calls else 0.0,
            "calls_in_window": calls,
            "open_remaining": self.retry_after(),
            "forced": self._forced,
            "probes_in_flight": (
                self._probes_issued - self._probes_succeeded if state == HALF_OPEN else 0
            ),
        }

    # -- internals -----------------------------------------------------------------

    def _refresh(self) -> None:
        """Open -> half-open once `open_until` has passed (lazily, on the next look)."""
        if self._state == OPEN and self._forced is None and self._clock() >= self._open_until:
            self._transition(HALF_OPEN)

    def _settle(self, episode: int | None, success: bool | None, duration: float) -> None:
        """Apply one settled call. `success` None means released (the call never ran)."""
        if episode is not None and episode != self._episode:
            return  # started under a state that no longer holds: old news
        if not self.options.enabled and self._forced is None:
            return
        if self._state == CLOSED:
            if success is not None:
                self._record_closed(success, duration)
        elif self._state == HALF_OPEN:
            self._settle_probe(success, duration)
        # Open: nothing is let through, so anything settled now started earlier.

    def _is_slow(self, duration: float) -> bool:
        limit = self.options.slow_call_duration
        return limit is not None and duration >= limit

    def _record_closed(self, success: bool, duration: float) -> None:
        limit = self.options.slow_call_duration
        slow = limit is not None and duration >= limit
        if success and not slow:
            totals: Sequence[int] = self._window.increment(_CALLS)
        else:
            self._window.add(1, 0 if success else 1, 1 if slow else 0)
            totals = self._window.totals()
        if self._forced is not None:
            return
        calls, failures, slow_calls = totals
        opts = self.options
        if calls < opts.min_calls:
            return
        # Divide rather than multiply the threshold: 3 / 10 >= 0.3, but 3 < 0.3 * 10.
        if failures / calls >= opts.failure_rate or (
            opts.slow_call_duration is not None and slow_calls / calls >= opts.slow_call_rate
        ):
            self._open()

    def _settle_probe(self, success: bool | None, duration: float) -> None:
        if self._probes_issued - self._probes_succeeded <= 0:
            return  # no probe out: a bool-API settlement of a call from an older state
        if success is None:
            self._probes_issued -= 1
            return
        if not success or self._is_slow(duration):
            self._open()
            return
        self._probes_succeeded += 1
        if self._probes_succeeded >= self.options.half_open_probes:
            self._window.clear()
            self._transition(CLOSED)

    def _open(self) -> None:
        self._open_until = self._clock() + self.options.open_for
        self._transition(OPEN)

    def _transition(self, new: State) -> None:
        """Enter `new`; a fresh episode so permits of the old state go stale."""
        old = self._state
        if old == new:
            return
        self._state = new
        self._episode += 1
        self._probes_issued = 0
        self._probes_succeeded = 0
        if new == CLOSED:
            self._open_until = 0.0
        if self._on_transition is not None:
            self._on_transition(old, new)
