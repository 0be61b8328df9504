"""Hedged calls: when an attempt is slow to answer, a second one races it.

A retry waits for a failure; a slow answer is not one, so a 500 ms straggler in
twenty calls sets the tail of everything built on that upstream. A hedge (Dean &
Barroso, "The Tail at Scale") sends the same request again once the first has
not answered after `after`, and the first complete answer wins; the other is
cancelled. Sent only for requests that may go twice (`rules.may_hedge`), and paid
for like a retry: each hedge spends the hedge budget and the retry budget, takes
a breaker permit and a rate limit token, so hedging adds a bounded share of load
and stops when the upstream is failing.

`after` is either fixed or a quantile (`p95`) of the upstream's recent latency,
kept by `LatencyHistogram`: a ring of fixed buckets over a rolling window, pure
and clock-driven like the breaker's counts. Until the window holds `min_samples`
answers the quantile says too little, and `fallback_after` is used instead.
This module decides *when*; `Pipeline` runs the race.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from proxy.resilience.budget import BudgetOptions, RetryBudget
from proxy.resilience.clock import Clock, monotonic


def _hedge_budget() -> BudgetOptions:
    return BudgetOptions(ratio=0.05, min_per_second=1.0, window=10.0)


@dataclass(frozen=True, slots=True)
class HedgeOptions:
    """When and how much to hedge one upstream; plain data, compared on reload.

    `after` is the fixed delay in seconds, or None to use the `quantile` of recent
    latency (`fallback_after` until `min_samples` answers are in the `window`).
    `max_extra` hedges at most per attempt; `budget` caps hedges to a share of calls.
    """

    after: float | None = 0.05
    quantile: float = 0.95
    fallback_after: float = 0.05
    min_samples: int = 50
    window: float = 10.0
    max_extra: int = 1
    budget: BudgetOptions = field(default_factory=_hedge_budget)

    def __post_init__(self) -> None:
        if self.after is not None and not self.after > 0:
            raise ValueError(f"after must be > 0 seconds, got {self.after!r}")
        if not 0.0 < self.quantile < 1.0:
            raise ValueError(f"quantile must be between 0 and 1, got {self.quantile!r}")
        if not self.fallback_after > 0:
            raise ValueError(f"fallback_after must be > 0 seconds, got {self.fallback_after!r}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples!r}")
        if not self.window > 0:
            raise ValueError(f"window must be > 0 seconds, got {self.window!r}")
        if self.max_extra < 1:
            raise ValueError(f"max_extra must be >= 1, got {self.max_extra!r}")


def _bounds(lowest: float, highest: float, growth: float) -> tuple[float, ...]:
    bounds = [lowest]
    while bounds[-1] < highest:
        bounds.append(bounds[-1] * growth)
    return tuple(bounds)


LATENCY_BOUNDS = _bounds(0.001, 60.0, 1.2)
"""Upper bounds of the latency buckets: 1 ms to 60 s, each 20% above the last.

A quantile is read as the upper bound of its bucket, so it is at most 20% late
(a hedge a little late, never early), with about 60 buckets to add up."""


class LatencyHistogram:
    """Answer latencies of one upstream over a rolling `window`, in fixed buckets.

    The window is a ring of `slots` time slots; a slot older than the window is
    subtracted from the running totals when time moves past it, so `quantile` adds
    up ~60 buckets, not every sample. Pure: time comes from `clock`.
    """

    def __init__(self, window: float = 10.0, slots: int = 10, clock: Clock = monotonic) -> None:
        if not window > 0 or slots < 1:
            raise ValueError("a latency histogram needs a window > 0 and at least one slot")
        self._slot_width = window / slots
        self._clock = clock
        size = len(LATENCY_BOUNDS) + 1  # the last bucket holds everything above 60 s
        self._ring = [[0] * size for _ in range(slots)]
        self._epochs = [-1] * slots  # which slot period each ring entry holds
        self._totals = [0] * size
        self._count = 0

    def record(self, seconds: float) -> None:
        """One answer took `seconds`."""
        slot = self._current()
        index = bisect.bisect_left(LATENCY_BOUNDS, seconds)
        slot[index] += 1
        self._totals[index] += 1
        self._count += 1

    def count(self) -> int:
        """Samples in the window."""
        self._current()
        return self._count

    def quantile(self, q: float) -> float | None:
        """The latency below which a share `q` of the window's samples fall, or None.

        Read as the upper bound of the bucket holding that rank (60 s past the
        last bound), so it errs late.
        """
        self._current()
        if self._count == 0:
            return None
        rank = max(1, math.ceil(q * self._count))
        seen = 0
        for index, count in enumerate(self._totals):
            seen += count
            if seen >= rank:
                return LATENCY_BOUNDS[min(index, len(LATENCY_BOUNDS) - 1)]
        return LATENCY_BOUNDS[-1]  # unreachable: the totals add up to the count

    def _current(self) -> list[int]:
        """The slot of now, after expiring every slot that fell out of the window."""
        epoch = math.floor(self._clock() / self._slot_width)
        ring, epochs = self._ring, self._epochs
        position = epoch % len(ring)
        if epochs[position] == epoch:
            return ring[position]
        for i, held in enumerate(epochs):
            if held != -1 and held <= epoch - len(ring):
                self._drop(i)
        if epochs[position] != -1:
            self._drop(position)
        epochs[position] = epoch
        return ring[position]

    def _drop(self, position: int) -> None:
        slot, totals = self._ring[position], self._totals
        for index, count in enumerate(slot):
            if count:
                totals[index] -= count
                self._count -= count
                slot[index] = 0
        self._epochs[position] = -1


class Hedging:
    """The hedging state of one upstream: its latency window and its hedge budget.

    Kept across reloads while the upstream's `hedge:` section is unchanged, like the
    breaker, so a reload does not forget the latency it learned.
    """

    def __init__(self, options: HedgeOptions, clock: Clock = monotonic) -> None:
        self.options = options
        self.latency = LatencyHistogram(options.window, clock=clock)
        self.budget = RetryBudget(options.budget, clock)

    def delay(self) -> float:
        """Seconds to wait for an attempt's answer before hedging it."""
        options = self.options
        if options.after is not None:
            return options.after
        if self.latency.count() < options.min_samples:
            return options.fallback_after
        learned = self.latency.quantile(options.quantile)
        return options.fallback_after if learned is None else learned

    def record_latency(self, seconds: float) -> None:
        """An attempt answered after `seconds` (or was cancelled after that long)."""
        self.latency.record(seconds)


def hedge_due_at(started: float, delay: float, sent: int) -> float:
    """When the next hedge of an attempt started at `started` is due, `sent` already sent.

    The k-th hedge waits k delays from the start, so with `max_extra: 2` a second
    hedge goes out only if neither of the first two answered in twice the delay.
    """
    return started + delay * (sent + 1)
