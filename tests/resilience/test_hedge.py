"""The hedge's pure parts: the rolling latency histogram, when a hedge is due, who may be hedged."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.resilience.budget import BudgetOptions
from proxy.resilience.clock import FakeClock
from proxy.resilience.hedge import (
    LATENCY_BOUNDS,
    HedgeOptions,
    Hedging,
    LatencyHistogram,
    hedge_due_at,
)
from proxy.resilience.rules import may_hedge, may_send_twice


def test_an_empty_histogram_has_no_quantile() -> None:
    histogram = LatencyHistogram(clock=FakeClock())
    assert histogram.count() == 0
    assert histogram.quantile(0.95) is None


def test_p95_of_mostly_fast_answers_is_the_fast_bucket() -> None:
    histogram = LatencyHistogram(clock=FakeClock())
    for _ in range(96):
        histogram.record(0.010)
    for _ in range(4):
        histogram.record(0.500)
    p95 = histogram.quantile(0.95)
    assert p95 is not None and 0.010 <= p95 < 0.010 * 1.2


def test_p95_moves_to_the_slow_bucket_when_more_than_5_percent_are_slow() -> None:
    histogram = LatencyHistogram(clock=FakeClock())
    for _ in range(90):
        histogram.record(0.010)
    for _ in range(10):
        histogram.record(0.500)
    p95 = histogram.quantile(0.95)
    assert p95 is not None and 0.500 <= p95 < 0.500 * 1.2


def test_samples_older_than_the_window_are_forgotten() -> None:
    clock = FakeClock()
    histogram = LatencyHistogram(window=10.0, slots=10, clock=clock)
    for _ in range(50):
        histogram.record(0.500)
    clock.advance(5.0)
    for _ in range(50):
        histogram.record(0.010)
    assert histogram.count() == 100
    clock.advance(6.0)  # the slow ones are 11 s old, the fast ones 6 s
    assert histogram.count() == 50
    p95 = histogram.quantile(0.95)
    assert p95 is not None and p95 < 0.5
    clock.advance(100.0)
    assert histogram.count() == 0


def test_a_latency_beyond_the_last_bound_is_counted_in_the_last_bucket() -> None:
    histogram = LatencyHistogram(clock=FakeClock())
    histogram.record(3600.0)
    assert histogram.quantile(0.5) == LATENCY_BOUNDS[-1]


@given(st.lists(st.floats(min_value=0.0, max_value=100.0), min_size=1, max_size=200))
def test_the_quantile_is_never_below_the_true_one_nor_20_percent_above(
    samples: list[float],
) -> None:
    histogram = LatencyHistogram(clock=FakeClock())
    for seconds in samples:
        histogram.record(seconds)
    ranked = sorted(samples)
    true_p95 = ranked[max(0, -(-len(ranked) * 95 // 100) - 1)]
    p95 = histogram.quantile(0.95)
    assert p95 is not None
    assert p95 >= min(true_p95, LATENCY_BOUNDS[-1])  # a hedge errs late, never early
    assert p95 <= max(true_p95 * 1.2 + 1e-9, LATENCY_BOUNDS[0])


def test_a_fixed_after_is_used_as_it_is() -> None:
    hedging = Hedging(HedgeOptions(after=0.05), FakeClock())
    for _ in range(100):
        hedging.record_latency(0.2)
    assert hedging.delay() == 0.05


def test_a_quantile_after_uses_the_fallback_until_enough_samples() -> None:
    hedging = Hedging(
        HedgeOptions(after=None, quantile=0.95, fallback_after=0.05, min_samples=20), FakeClock()
    )
    for _ in range(19):
        hedging.record_latency(0.2)
    assert hedging.delay() == 0.05
    hedging.record_latency(0.2)
    assert 0.2 <= hedging.delay() < 0.24


def test_a_quantile_after_returns_to_the_fallback_when_the_window_empties() -> None:
    clock = FakeClock()
    hedging = Hedging(HedgeOptions(after=None, min_samples=5, window=10.0), clock)
    for _ in range(5):
        hedging.record_latency(0.3)
    assert hedging.delay() >= 0.3
    clock.advance(11.0)
    assert hedging.delay() == 0.05


def test_the_kth_hedge_is_due_k_delays_after_the_start() -> None:
    assert hedge_due_at(10.0, 0.05, 0) == pytest.approx(10.05)
    assert hedge_due_at(10.0, 0.05, 1) == pytest.approx(10.10)


def test_the_hedge_budget_allows_its_ratio_of_calls_plus_the_floor() -> None:
    clock = FakeClock()
    options = HedgeOptions(budget=BudgetOptions(ratio=0.05, min_per_second=0.0, window=10.0))
    hedging = Hedging(options, clock)
    for _ in range(100):
        hedging.budget.record_request()
    spent = 0
    while hedging.budget.can_spend():
        assert hedging.budget.try_spend()
        spent += 1
    assert spent == 5
    assert not hedging.budget.try_spend()


@pytest.mark.parametrize(
    "bad",
    [
        {"after": 0.0},
        {"quantile": 1.0},
        {"fallback_after": 0.0},
        {"min_samples": 0},
        {"max_extra": 0},
        {"window": 0.0},
    ],
)
def test_options_out_of_range_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        HedgeOptions(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "keyed", "replayable", "idempotent_upstream", "hedged"),
    [
        ("GET", False, True, False, True),
        ("HEAD", False, True, False, True),
        ("POST", False, True, True, False),  # no key: it could act twice
        ("POST", True, True, False, False),  # the upstream does not keep keys
        ("POST", True, True, True, True),
        ("PATCH", True, True, True, True),
        ("PUT", False, True, False, False),  # idempotent, but two racing writes may interleave
        ("DELETE", False, True, False, False),
        ("GET", False, False, False, False),  # a streamed body cannot go twice
        ("POST", True, False, True, False),
    ],
)
def test_who_may_be_hedged(
    method: str, keyed: bool, replayable: bool, idempotent_upstream: bool, hedged: bool
) -> None:
    assert may_hedge(method, keyed, replayable, idempotent_upstream) is hedged


@given(
    st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_whatever_may_be_hedged_may_be_sent_twice(
    method: str, keyed: bool, replayable: bool, idempotent_upstream: bool
) -> None:
    if may_hedge(method, keyed, replayable, idempotent_upstream):
        assert may_send_twice(method, keyed, replayable)
