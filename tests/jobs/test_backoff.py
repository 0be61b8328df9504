"""backoff_delay: bounded, growing, jittered."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.jobs import RetryPolicy, backoff_delay


class FixedRandom(random.Random):
    """An rng whose `random()` always returns one value, to pin the jitter."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def test_first_retry_waits_about_base() -> None:
    policy = RetryPolicy(base=1.0, jitter=0.5)
    assert backoff_delay(policy, 1, FixedRandom(0.0)) == 1.0
    assert backoff_delay(policy, 1, FixedRandom(0.999)) == pytest.approx(0.5, abs=1e-3)


def test_delay_doubles_per_attempt_until_max() -> None:
    policy = RetryPolicy(base=1.0, multiplier=2.0, max=10.0, jitter=0.0)
    delays = [backoff_delay(policy, n, random.Random(1)) for n in range(1, 8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_jitter_spreads_delays() -> None:
    policy = RetryPolicy(base=10.0, jitter=0.5)
    rng = random.Random(7)
    delays = {round(backoff_delay(policy, 1, rng), 6) for _ in range(20)}
    assert len(delays) > 1
    assert all(5.0 <= d <= 10.0 for d in delays)


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(jitter=1.5)


policies = st.builds(
    RetryPolicy,
    base=st.floats(0.0, 100.0),
    multiplier=st.floats(1.0, 10.0),
    max=st.floats(0.0, 3600.0),
    jitter=st.floats(0.0, 1.0),
)


@given(policy=policies, attempts=st.integers(1, 10_000), seed=st.integers(0, 2**32))
def test_delay_never_exceeds_max_nor_goes_negative(
    policy: RetryPolicy, attempts: int, seed: int
) -> None:
    delay = backoff_delay(policy, attempts, random.Random(seed))
    assert 0.0 <= delay <= policy.max


@given(policy=policies, attempts=st.integers(1, 200), jitter_draw=st.floats(0.0, 0.999))
def test_delay_never_shrinks_as_attempts_grow(
    policy: RetryPolicy, attempts: int, jitter_draw: float
) -> None:
    rng = FixedRandom(jitter_draw)
    assert backoff_delay(policy, attempts + 1, rng) >= backoff_delay(policy, attempts, rng)
