"""Retry budget: retries may add at most a fraction of recent traffic.

Per-request retry limits are not enough: when an upstream fails every call, three
attempts per request triple the load on the thing that is already failing. A retry
budget caps retries across all requests to an upstream, as Finagle and linkerd do
(`RetryBudget(ttl, minRetriesPerSec, percentCanRetry)`): over a rolling `window`,

    retries <= ratio * requests + min_per_second * window

`ratio` keeps a storm bounded to a fixed fraction of extra load; the floor
(`min_per_second`) lets a quiet upstream, which sees too few requests for the ratio
to earn anything, still retry the odd failure. Pure and clock-driven; the pipeline
calls `record_request()` once per call (not per retry) and `try_spend()` before each
retry.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.resilience.breaker import RollingCounts
from proxy.resilience.clock import Clock, monotonic

_BUCKETS = 10
_REQUESTS, _RETRIES = 0, 1


@dataclass(frozen=True, slots=True)
class BudgetOptions:
    """Retry budget of one upstream: `ratio` of requests plus `min_per_second` floor."""

    ratio: float = 0.2
    min_per_second: float = 10.0
    window: float = 10.0

    def __post_init__(self) -> None:
        if self.ratio < 0:
            raise ValueError(f"ratio must be >= 0, got {self.ratio!r}")
        if self.min_per_second < 0:
            raise ValueError(f"min_per_second must be >= 0, got {self.min_per_second!r}")
        if not self.window > 0:
            raise ValueError(f"window must be > 0 seconds, got {self.window!r}")


class RetryBudget:
    """Counts requests and retries over a rolling window and says when a retry fits."""

    def __init__(self, options: BudgetOptions | None = None, clock: Clock = monotonic) -> None:
        self.options = options if options is not None else BudgetOptions()
        self._counts = RollingCounts(self.options.window, _BUCKETS, 2, clock)

    def record_request(self) -> None:
        """One call (its first attempt) was made; it earns `ratio` of a retry."""
        self._counts.increment(_REQUESTS)

    def can_spend(self) -> bool:
        """Whether `try_spend` would succeed now, without spending.

        A hedge needs two budgets (its own and the retry budget) and a breaker
        permit; it asks them all before spending any, so a refusal wastes nothing.
        """
        requests, retries = self._counts.totals()
        return retries + 1 <= self._allowance(requests)

    def try_spend(self) -> bool:
        """Take one retry from the budget; False means do not retry (and count it)."""
        requests, retries = self._counts.totals()
        if retries + 1 > self._allowance(requests):
            return False
        self._counts.increment(_RETRIES)
        return True

    def snapshot(self) -> dict[str, float]:
        """Requests, retries and what is left over the current window."""
        requests, retries = self._counts.totals()
        allowance = self._allowance(requests)
        return {
            "requests_in_window": requests,
            "retries_in_window": retries,
            "allowance": allowance,
            "available": max(0.0, allowance - retries),
        }

    def _allowance(self, requests: int) -> float:
        opts = self.options
        # Round away float noise (0.29 * 100 is 28.999999999999996) before comparing.
        return round(opts.ratio * requests + opts.min_per_second * opts.window, 9)
