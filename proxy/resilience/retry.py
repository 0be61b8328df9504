"""Whether, and after how long, a failed attempt is tried again.

Pure decisions from an `Outcome`, the attempts made and the time left; the
pipeline carries them out. Keeping them here means one place answers "why was
this retried (or not)", for the code, the tests and the metrics.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass, field

from proxy.resilience.backoff import BackoffOptions, backoff_delay
from proxy.resilience.outcome import RESPONSE, Outcome
from proxy.resilience.rules import CONDITION_OF_KIND, RETRY_AFTER_STATUSES


@dataclass(frozen=True, slots=True)
class RetryOptions:
    attempts: int = 3
    backoff: BackoffOptions = field(default_factory=BackoffOptions)
    conditions: frozenset[str] = frozenset({"connect-failure", "timeout", "reset"})
    statuses: frozenset[int] = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """`retry` with a `delay`, or not, and why: the reason is a metric label."""

    retry: bool
    delay: float = 0.0
    reason: str = ""  # what failed: connect_failure, timeout, reset, status_503 ...
    refused_by: str = ""  # why not: not_retryable_outcome, attempts, deadline, request


_NOT_RETRYABLE = RetryDecision(False, refused_by="not_retryable_outcome")
"""The usual answer (a 2xx, a 4xx): one frozen value rather than one per call."""


def retry_reason(outcome: Outcome, options: RetryOptions) -> str | None:
    """The retry reason when `outcome` is one the options retry on, else None."""
    if outcome.kind is RESPONSE:
        return f"status_{outcome.status}" if outcome.status in options.statuses else None
    condition = CONDITION_OF_KIND.get(outcome.kind)
    if condition is not None and condition in options.conditions:
        return condition.replace("-", "_")
    return None


def decide(
    outcome: Outcome,
    attempts_made: int,
    remaining: float,
    options: RetryOptions,
    request_retryable: bool,
    rng: random.Random | None = None,
) -> RetryDecision:
    """Retry `outcome`? Never past the attempts, never when the wait would eat the deadline."""
    reason = retry_reason(outcome, options)
    if reason is None:
        return _NOT_RETRYABLE
    if not request_retryable:
        return RetryDecision(False, reason=reason, refused_by="request")
    if attempts_made >= options.attempts:
        return RetryDecision(False, reason=reason, refused_by="attempts")
    delay = backoff_delay(options.backoff, attempts_made, rng)
    if outcome.retry_after is not None and outcome.status in RETRY_AFTER_STATUSES:
        delay = max(delay, outcome.retry_after)
    if delay >= remaining:
        return RetryDecision(False, delay=delay, reason=reason, refused_by="deadline")
    return RetryDecision(True, delay=delay, reason=reason)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    wall = time.time() if now is None else now
    return max(0.0, when.timestamp() - wall)
