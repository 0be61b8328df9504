"""Turns an upstream's config into its policy objects (breaker, bulkhead, budget, fallback).

Kept apart from `Upstream` because these objects hold state that must outlive a
config reload: when an upstream's breaker settings did not change, the new config
keeps the old breaker (and its open/closed state), and likewise for the budget and
the stale cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from proxy import config as cfg
from proxy.resilience.breaker import Breaker, BreakerOptions
from proxy.resilience.budget import BudgetOptions, RetryBudget
from proxy.resilience.bulkhead import Bulkhead, BulkheadOptions
from proxy.resilience.clock import Clock
from proxy.resilience.fallback import Fallback, FallbackOptions, StaticResponse


def breaker_options(section: cfg.Breaker) -> BreakerOptions:
    return BreakerOptions(
        enabled=section.enabled,
        window=section.window,
        min_calls=section.min_calls,
        failure_rate=section.failure_rate,
        slow_call_duration=section.slow_call.duration,
        slow_call_rate=section.slow_call.rate,
        open_for=section.open_for,
        half_open_probes=section.half_open_probes,
    )


def fallback_options(section: cfg.Fallback) -> FallbackOptions:
    static = None
    if section.has_static:
        headers = dict(section.headers)
        if section.json_body is not None:
            body = json.dumps(section.json_body).encode()
            headers.setdefault("Content-Type", "application/json")
        else:
            body = (section.body or "").encode()
        static = StaticResponse(status=section.status or 200, headers=headers, body=body)
    return FallbackOptions(
        on=frozenset(section.on),
        static=static,
        stale=section.stale is not None,
        stale_max_age=section.stale.max_age if section.stale else 300.0,
        stale_max_entries=section.stale.max_entries if section.stale else 1000,
    )


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
            bulkhead = Bulkhead(
                BulkheadOptions(config.bulkhead.max_concurrent, config.bulkhead.max_queue)
            )

        if previous is not None and sections[2] == old[2]:
            budget = previous.budget
        else:
            section = config.retry.budget
            budget = RetryBudget(
                BudgetOptions(section.ratio, section.min_per_second, section.window), clock
            )

        if previous is not None and sections[3] == old[3]:
            fallback = previous.fallback
        elif config.fallback is not None:
            fallback = Fallback(fallback_options(config.fallback), clock)
        else:
            fallback = None
        return cls(breaker, bulkhead, budget, fallback, sections)
