"""Turns an upstream's config into its policy objects (breaker, bulkhead, budget, fallback).

Kept apart from `Upstream` because these objects hold state that must outlive a
config reload: when an upstream's breaker settings did not change, the new config
keeps the old breaker (and its open/closed state), and likewise for the budget and
the stale cache.
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
)
from proxy.resilience.breaker import Breaker
from proxy.resilience.budget import RetryBudget
from proxy.resilience.bulkhead import Bulkhead
from proxy.resilience.clock import Clock
from proxy.resilience.fallback import Fallback


@dataclass
class Policies:
    """The stateful policies of one upstream, and the config sections they came from."""

    breaker: Breaker | None
    bulkhead: Bulkhead
    budget: RetryBudget
    fallback: Fallback | None
    sections: tuple[object, ...]  # (breaker, bulkhead, budget, fallback) config, for reuse

    @classmethod
    def build(
        cls,
        config: cfg.Upstream,
        clock: Clock,
        on_transition: Callable[[str, str], None] | None = None,
        previous: Policies | None = None,
    ) -> Policies:
        """New policies for `config`, keeping each of `previous` whose settings did not change."""
        sections = (config.breaker, config.bulkhead, config.retry.budget, config.fallback)
        old = previous.sections if previous is not None else (None, None, None, None)

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
        return cls(breaker, bulkhead, budget, fallback, sections)
