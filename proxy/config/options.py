"""Config sections turned into the options of the policies that run them, in one place.

The resilience layer (`proxy.resilience`) and the job worker take plain frozen
option dataclasses and know nothing of the config; this module is the one seam
between the two, so a new config field is wired here and nowhere else.
"""

from __future__ import annotations

import json

from proxy.config.model import JobRetry
from proxy.config.upstream import (
    Breaker,
    Bulkhead,
    Fallback,
    Hedge,
    RateLimit,
    RetryBudget,
    Tls,
    Upstream,
)
from proxy.jobs.worker import RetryPolicy
from proxy.resilience.backoff import BackoffOptions
from proxy.resilience.breaker import BreakerOptions
from proxy.resilience.budget import BudgetOptions
from proxy.resilience.bulkhead import BulkheadOptions
from proxy.resilience.fallback import FallbackOptions, StaticResponse
from proxy.resilience.hedge import HedgeOptions
from proxy.resilience.ratelimit import RateLimitOptions
from proxy.resilience.retry import RetryOptions
from proxy.tls import TlsOptions


def breaker_options(section: Breaker) -> BreakerOptions:
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


def fallback_options(section: Fallback) -> FallbackOptions:
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


def bulkhead_options(section: Bulkhead) -> BulkheadOptions:
    return BulkheadOptions(section.max_concurrent, section.max_queue)


def budget_options(section: RetryBudget) -> BudgetOptions:
    return BudgetOptions(section.ratio, section.min_per_second, section.window)


def retry_options(upstream: Upstream) -> RetryOptions:
    backoff = upstream.retry.backoff
    return RetryOptions(
        attempts=upstream.retry.attempts,
        backoff=BackoffOptions(backoff.base, backoff.multiplier, backoff.max, backoff.jitter),
        conditions=upstream.retry.conditions,
        statuses=upstream.retry.statuses,
    )


def tls_options(section: Tls) -> TlsOptions:
    return TlsOptions(
        ca_file=section.ca_file,
        system_ca=section.trusts_system,
        cert_file=section.cert_file,
        key_file=section.key_file,
        server_name=section.server_name,
        min_version=section.min_version,
        insecure_skip_verify=section.insecure_skip_verify,
    )


def job_retry_policy(section: JobRetry) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=section.max_attempts,
        base=section.base,
        multiplier=section.multiplier,
        max=section.max,
    )


def rate_limit_options(section: RateLimit) -> RateLimitOptions:
    return RateLimitOptions(
        rate=section.rate,
        burst=section.burst,
        scope=section.scope,
        on_store_down=section.on_store_down,
    )


def hedge_options(section: Hedge) -> HedgeOptions:
    quantile = section.quantile
    budget = section.budget
    return HedgeOptions(
        after=None if quantile is not None else float(section.after),
        quantile=quantile if quantile is not None else 0.95,
        fallback_after=section.fallback_after,
        min_samples=section.min_samples,
        window=section.window,
        max_extra=section.max_extra,
        budget=BudgetOptions(budget.ratio, budget.min_per_second, budget.window),
    )
