"""Fault decisions and latency sampling as pure functions, with a seeded RNG."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.simulator.config import Faults, LognormalLatency, UniformLatency, parse_faults
from proxy.simulator.faults import Action, FaultPlan, sample_latency_ms


def plan(seed: int = 1, **faults) -> FaultPlan:
    return FaultPlan(parse_faults(faults), random.Random(seed))


def quantile(samples: list[float], q: float) -> float:
    return sorted(samples)[int(q * len(samples))]


def test_lognormal_hits_its_median_and_p99():
    latency = LognormalLatency(dist="lognormal", p50_ms=40, p99_ms=200)
    rng = random.Random(42)
    samples = [sample_latency_ms(latency, rng) for _ in range(50_000)]
    assert quantile(samples, 0.50) == pytest.approx(40, rel=0.05)
    assert quantile(samples, 0.99) == pytest.approx(200, rel=0.10)


@given(
    p50=st.floats(min_value=0.1, max_value=10_000),
    ratio=st.floats(min_value=1.0, max_value=1_000),
)
def test_lognormal_parameters_reproduce_the_configured_quantiles(p50, ratio):
    latency = LognormalLatency(dist="lognormal", p50_ms=p50, p99_ms=p50 * ratio)
    assert math.exp(latency.mu) == pytest.approx(p50)
    assert math.exp(latency.mu + 2.3263478740408408 * latency.sigma) == pytest.approx(p50 * ratio)


@given(low=st.floats(0, 1000), width=st.floats(0, 1000), seed=st.integers())
def test_uniform_stays_within_its_bounds(low, width, seed):
    latency = UniformLatency(dist="uniform", min_ms=low, max_ms=low + width)
    assert low <= sample_latency_ms(latency, random.Random(seed)) <= low + width


def test_fixed_latency_is_exact_and_none_is_zero():
    assert plan(latency={"dist": "fixed", "ms": 50}).decide().delay_s == 0.05
    assert plan().decide().delay_s == 0.0


def test_no_faults_always_pass():
    healthy = plan()
    assert {healthy.decide().action for _ in range(1000)} == {Action.PASS}


def test_fail_next_fails_exactly_count_then_passes():
    faulty = plan(fail_next={"count": 3, "status": 502, "kind": "status"})
    decisions = [faulty.decide() for _ in range(5)]
    assert [d.action for d in decisions] == [Action.STATUS] * 3 + [Action.PASS] * 2
    assert decisions[0].status == 502


def test_fail_next_wins_over_rates():
    faulty = plan(fail_next={"count": 1, "kind": "reset"}, error_rate=1.0)
    assert faulty.decide().action is Action.RESET
    assert faulty.decide().action is Action.STATUS


@pytest.mark.parametrize(
    ("faults", "action"),
    [
        ({"hang_rate": 1.0}, Action.HANG),
        ({"reset_rate": 1.0}, Action.RESET),
        ({"error_rate": 1.0}, Action.STATUS),
    ],
)
def test_rate_one_always_faults(faults, action):
    faulty = plan(**faults)
    assert {faulty.decide().action for _ in range(100)} == {action}


def test_error_rate_is_roughly_honoured():
    faulty = plan(seed=7, error_rate=0.2, retry_after=2)
    decisions = [faulty.decide() for _ in range(10_000)]
    errors = [d for d in decisions if d.action is Action.STATUS]
    assert len(errors) / len(decisions) == pytest.approx(0.2, abs=0.02)
    assert {(d.status, d.retry_after) for d in errors} == {(503, 2)}


def test_slow_body_passes_with_a_rate():
    decision = plan(slow_body_rate=1.0, slow_body_bytes_per_s=300).decide()
    assert (decision.action, decision.slow_body_bytes_per_s) == (Action.PASS, 300)


def test_same_seed_gives_the_same_sequence():
    faults = {"error_rate": 0.3, "latency": {"dist": "lognormal", "p50_ms": 5, "p99_ms": 50}}
    first, second = plan(9, **faults), plan(9, **faults)
    assert [first.decide() for _ in range(200)] == [second.decide() for _ in range(200)]


def test_replace_restarts_fail_next():
    faulty = plan(fail_next={"count": 1})
    faulty.decide()
    faulty.replace(Faults.model_validate({"fail_next": {"count": 2}}))
    assert faulty.remaining_failures == 2


def test_replace_with_a_seed_reseeds():
    faulty = plan(seed=1)
    faulty.decide()
    faulty.replace(Faults(seed=5))
    assert faulty.rng.random() == random.Random(5).random()
