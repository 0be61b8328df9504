"""Retry budget behaviour, driven by a FakeClock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.resilience.budget import BudgetOptions, RetryBudget
from proxy.resilience.clock import FakeClock


def make(**kw: float) -> tuple[RetryBudget, FakeClock]:
    clock = FakeClock()
    return RetryBudget(BudgetOptions(**kw), clock), clock


def spend_all(budget: RetryBudget, wanted: int) -> int:
    return sum(budget.try_spend() for _ in range(wanted))


@pytest.mark.parametrize("bad", [{"ratio": -0.1}, {"min_per_second": -1}, {"window": 0}])
def test_invalid_options_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BudgetOptions(**bad)


def test_retry_storm_is_capped_at_ratio_plus_floor() -> None:
    budget, _ = make(ratio=0.2, min_per_second=10.0, window=10.0)
    granted = 0
    for _ in range(1000):  # every request fails and wants a retry
        budget.record_request()
        granted += spend_all(budget, 1)
    assert granted == 0.2 * 1000 + 10.0 * 10.0


def test_retry_storm_with_three_retries_per_request_is_capped() -> None:
    budget, _ = make(ratio=0.2, min_per_second=0.0, window=10.0)
    granted = 0
    for _ in range(1000):
        budget.record_request()
        granted += spend_all(budget, 3)
    assert granted == 200


def test_floor_allows_retries_at_low_traffic() -> None:
    budget, _ = make(ratio=0.2, min_per_second=1.0, window=10.0)
    budget.record_request()  # 0.2 of a retry earned: not enough on its own
    assert budget.try_spend()


def test_floor_is_per_window_not_unbounded() -> None:
    budget, _ = make(ratio=0.0, min_per_second=1.0, window=10.0)
    assert spend_all(budget, 50) == 10


def test_no_floor_and_no_requests_means_no_retries() -> None:
    budget, _ = make(ratio=0.2, min_per_second=0.0)
    assert not budget.try_spend()


def test_ratio_earns_retries() -> None:
    budget, _ = make(ratio=0.5, min_per_second=0.0)
    for _ in range(4):
        budget.record_request()
    assert spend_all(budget, 5) == 2


def test_float_noise_does_not_cost_a_retry() -> None:
    budget, _ = make(ratio=0.29, min_per_second=0.0)
    for _ in range(100):
        budget.record_request()
    assert spend_all(budget, 100) == 29


def test_window_expiry_restores_the_budget() -> None:
    budget, clock = make(ratio=0.0, min_per_second=1.0, window=10.0)
    assert spend_all(budget, 20) == 10
    clock.advance(10.0)
    assert spend_all(budget, 20) == 10


def test_window_expiry_forgets_old_requests() -> None:
    budget, clock = make(ratio=0.5, min_per_second=0.0, window=10.0)
    for _ in range(10):
        budget.record_request()
    clock.advance(10.0)
    assert not budget.try_spend()


def test_retries_spent_recently_still_count() -> None:
    budget, clock = make(ratio=0.0, min_per_second=1.0, window=10.0)
    assert spend_all(budget, 10) == 10
    clock.advance(5.0)
    assert not budget.try_spend()


def test_snapshot_values() -> None:
    budget, _ = make(ratio=0.2, min_per_second=1.0, window=10.0)
    for _ in range(10):
        budget.record_request()
    assert spend_all(budget, 3) == 3
    assert budget.snapshot() == {
        "requests_in_window": 10,
        "retries_in_window": 3,
        "allowance": 12.0,
        "available": 9.0,
    }


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50), st.floats(0, 3)), max_size=60),
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]),
    floor=st.sampled_from([0.0, 0.5, 10.0]),
)
def test_granted_retry_never_exceeds_allowance(
    steps: list[tuple[int, int, float]], ratio: float, floor: float
) -> None:
    """Checked when a retry is granted: old requests may later leave the window first."""
    budget, clock = make(ratio=ratio, min_per_second=floor, window=10.0)
    for requests, retries, advance in steps:
        for _ in range(requests):
            budget.record_request()
        for _ in range(retries):
            if budget.try_spend():
                snap = budget.snapshot()
                assert snap["retries_in_window"] <= snap["allowance"]
        clock.advance(advance)
