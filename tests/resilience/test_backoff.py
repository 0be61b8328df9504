import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.resilience.backoff import BackoffOptions, backoff_ceiling, backoff_delay


def test_default_schedule_is_100_200_400_ms() -> None:
    options = BackoffOptions(base=0.1, multiplier=2, max=2.0, jitter="none")
    assert [backoff_delay(options, n) for n in (1, 2, 3)] == pytest.approx([0.1, 0.2, 0.4])


def test_schedule_stops_growing_at_max() -> None:
    options = BackoffOptions(base=0.1, multiplier=2, max=0.3, jitter="none")
    assert [backoff_delay(options, n) for n in (1, 2, 3, 10)] == pytest.approx([0.1, 0.2, 0.3, 0.3])


def test_full_jitter_stays_between_zero_and_the_ceiling() -> None:
    options = BackoffOptions(base=0.1, multiplier=2, max=5.0, jitter="full")
    rng = random.Random(7)
    delays = [backoff_delay(options, 3, rng) for _ in range(500)]
    assert all(0 <= d <= 0.4 for d in delays)
    assert min(delays) < 0.1 < max(delays)  # actually spread, not constant


def test_equal_jitter_keeps_at_least_half_the_ceiling() -> None:
    options = BackoffOptions(base=0.1, multiplier=2, max=5.0, jitter="equal")
    rng = random.Random(7)
    delays = [backoff_delay(options, 2, rng) for _ in range(500)]
    assert all(0.1 <= d <= 0.2 for d in delays)


@given(
    base=st.floats(0.001, 5),
    multiplier=st.floats(1, 10),
    cap=st.floats(0.001, 60),
    retry=st.integers(1, 10_000),
    jitter=st.sampled_from(["none", "full", "equal"]),
    seed=st.integers(0, 2**32),
)
def test_backoff_never_exceeds_max(
    base: float, multiplier: float, cap: float, retry: int, jitter: str, seed: int
) -> None:
    options = BackoffOptions(base, multiplier, max(cap, base), jitter)  # type: ignore[arg-type]
    delay = backoff_delay(options, retry, random.Random(seed))
    assert 0.0 <= delay <= options.max
    assert backoff_ceiling(options, retry) <= options.max
