"""A job's retry waits: the pipeline's backoff (one function), bounded, growing, jittered."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.jobs import RetryPolicy
from proxy.resilience.backoff import backoff_delay


def test_first_retry_waits_between_half_and_all_of_base() -> None:
    policy = RetryPolicy(base=10.0)
    rng = random.Random(7)
    delays = {round(backoff_delay(policy.backoff, 1, rng), 6) for _ in range(20)}
    assert len(delays) > 1, "jittered"
    assert all(5.0 <= d <= 10.0 for d in delays)


def test_delay_doubles_per_attempt_until_max() -> None:
    policy = RetryPolicy(base=1.0, multiplier=2.0, max=10.0, jitter="none")
    delays = [backoff_delay(policy.backoff, n, random.Random(1)) for n in range(1, 8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="multiplier"):
        RetryPolicy(multiplier=0.5)


policies = st.builds(
    RetryPolicy,
    base=st.floats(0.0, 100.0),
    multiplier=st.floats(1.0, 10.0),
    max=st.floats(0.0, 3600.0),
)


@given(policy=policies, attempts=st.integers(1, 10_000), seed=st.integers(0, 2**32))
def test_delay_never_exceeds_max_nor_goes_negative(
    policy: RetryPolicy, attempts: int, seed: int
) -> None:
    delay = backoff_delay(policy.backoff, attempts, random.Random(seed))
    assert 0.0 <= delay <= policy.max


@given(policy=policies, attempts=st.integers(1, 200))
def test_the_shortest_wait_never_shrinks_as_attempts_grow(
    policy: RetryPolicy, attempts: int
) -> None:
    shortest = RetryPolicy(policy.max_attempts, policy.base, policy.multiplier, policy.max, "none")
    now = backoff_delay(shortest.backoff, attempts)
    assert backoff_delay(shortest.backoff, attempts + 1) >= now
