"""Turns an upstream's config into its policy objects (breaker, bulkhead, budget, fallback,
rate limit, hedging).

Kept apart from `Upstream` because these objects hold state that must outlive a
config reload: when an upstream's breaker settings did not change, the new config
keeps the old breaker (and its open/closed state), and likewise for the budget and
the stale cache, and the rate limit's bucket.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from proxy.config import upstream as cfg
from proxy.config.options import (
    breaker_options,
    budget_options,
    bulkhead_options,
    fallback_options,
    hedge_options,
    rate_limit_options,
)
from proxy.resilience.breaker import Breaker
from proxy.resilience.budget import RetryBudget
from proxy.resilience.bulkhead import Bulkhead
from proxy.resilience.clock import Clock
from proxy.resilience.fallback import Fallback
from proxy.resilience.hedge import Hedging
from proxy.resilience.ratelimit import BucketStore, LocalLimiter, RateLimiter, SharedLimiter


@dataclass
class Policies:
    """The stateful policies of one upstream, and the config sections they came from."""

    breaker: Breaker | None
    bulkhead: Bulkhead
    budget: RetryBudget
    fallback: Fallback | None
    sections: tuple[object, ...]  # (breaker, bulkhead, budget, fallback, rate, hedge) config
    limiter: RateLimiter | None = None
    hedging: Hedging | None = None

    @classmethod
    def build(
        cls,
        config: cfg.Upstream,
        clock: Clock,
        on_transition: Callable[[str, str], None] | None = None,
        previous: Policies | None = None,
        *,
        name: str = "",
        buckets: BucketStore | None = None,
    ) -> Policies:
        """New policies for `config`, keeping each of `previous` whose settings did not change.

        A `scope: shared` rate limit keeps its bucket in `buckets` under the upstream's
        `name`; it is an error to ask for one without a store.
        """
        sections = (
            config.breaker,
            config.bulkhead,
            config.retry.budget,
            config.fallback,
            config.rate_limit,
            config.hedge,
        )
        old = previous.sections if previous is not None else (None,) * len(sections)

        if previous is not None and sections[0] == old[0]:
            breaker = previous.breaker
        elif config.breaker.enabled:
            breaker = Breaker(breaker_options(config.breaker), clock, on_transition)
        else:
            breaker = None

        if previous is not None and sections[1] == old[1]:
            bulkhead = previous.bulkhead
        else:
            bulkhead = Bulkhead(bulkhead_options(config.bulkhead))

        if previous is not None and sections[2] == old[2]:
            budget = previous.budget
        else:
            budget = RetryBudget(budget_options(config.retry.budget), clock)

        if previous is not None and sections[3] == old[3]:
            fallback = previous.fallback
        elif config.fallback is not None:
            fallback = Fallback(fallback_options(config.fallback), clock)
        else:
            fallback = None

        limit = config.rate_limit
        limiter: RateLimiter | None
        if previous is not None and sections[4] == old[4]:
            limiter = previous.limiter
        elif limit is None:
            limiter = None
        elif limit.scope == "local":
            limiter = LocalLimiter(rate_limit_options(limit), clock)
        elif buckets is None:
            raise ValueError(f"upstream {name!r}: a shared rate limit needs a store")
        else:
            limiter = SharedLimiter(buckets, name, rate_limit_options(limit), clock)

        hedging: Hedging | None
        if previous is not None and sections[5] == old[5]:
            hedging = previous.hedging  # the latency it learned survives a reload
        elif config.hedge is None:
            hedging = None
        else:
            hedging = Hedging(hedge_options(config.hedge), clock)
        return cls(breaker, bulkhead, budget, fallback, sections, limiter, hedging)
