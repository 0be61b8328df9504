"""The pipeline benchmark's pieces: configs, arithmetic, checks and report.
No load is generated and no server is started here."""

from __future__ import annotations

from typing import Any

import pytest

from bench.pipeline_cost import (
    COST_VARIANTS,
    FAILING_UPSTREAM,
    FAILURE_VARIANTS,
    QUICK,
    combine,
    cost_yaml,
    failure_checks,
    failure_yaml,
    is_open,
    markdown,
    policy_call_ns,
    ratios,
)
from proxy.config.loader import validate_text
from proxy.config.model import Config

UPSTREAM = "http://127.0.0.1:9"


def _config(text: str) -> Config:
    config, errors = validate_text(text, "bench.yaml")
    assert config is not None, errors
    return config


def _round(requests: int, seconds: float, cpu: float, p50: float, p99: float) -> dict[str, Any]:
    return {
        "requests": requests,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "cpu_us_per_request": cpu / requests * 1e6,
        "p50_ms": p50,
        "p90_ms": p50 * 2,
        "p99_ms": p99,
        "errors": 0,
    }


def test_policies_variant_keeps_every_default_policy() -> None:
    upstream = _config(cost_yaml(8080, 9901, UPSTREAM, "policies")).upstreams["bench"]

    assert upstream.breaker.enabled
    assert upstream.bulkhead.max_concurrent == 100
    assert upstream.retry.attempts == 3


def test_bare_variant_turns_the_breaker_off_and_never_fills_the_bulkhead() -> None:
    upstream = _config(cost_yaml(8080, 9901, UPSTREAM, "bare")).upstreams["bench"]

    assert not upstream.breaker.enabled
    assert upstream.bulkhead.max_concurrent == 100_000
    assert upstream.timeout.per_try == 30.0  # the rest is the bench config of bench.run


@pytest.mark.parametrize("variant", list(FAILURE_VARIANTS))
def test_failure_variants_wait_one_second_once(variant: str) -> None:
    upstream = _config(failure_yaml(8080, 9901, UPSTREAM, variant)).upstreams[FAILING_UPSTREAM]

    assert (upstream.timeout.per_try, upstream.timeout.total) == (1.0, 1.0)
    assert upstream.retry.attempts == 1


def test_failure_breaker_opens_after_ten_calls_for_thirty_seconds() -> None:
    for variant in ("breaker", "breaker+fallback"):
        upstream = _config(failure_yaml(8080, 9901, UPSTREAM, variant)).upstreams[FAILING_UPSTREAM]
        breaker = upstream.breaker
        assert (breaker.enabled, breaker.min_calls, breaker.open_for) == (True, 10, 30.0)
        assert breaker.failure_rate == 0.5
    plain = _config(failure_yaml(8080, 9901, UPSTREAM, "no-breaker")).upstreams[FAILING_UPSTREAM]
    assert not plain.breaker.enabled


def test_only_the_fallback_variant_has_a_fallback() -> None:
    have = {
        variant: _config(failure_yaml(8080, 9901, UPSTREAM, variant))
        .upstreams[FAILING_UPSTREAM]
        .fallback
        is not None
        for variant in FAILURE_VARIANTS
    }

    assert have == {"breaker": False, "breaker+fallback": True, "no-breaker": False}


def test_combine_sums_counts_and_cpu_and_averages_percentiles() -> None:
    row = combine([_round(1000, 1.0, 0.2, 1.0, 3.0), _round(3000, 1.0, 0.4, 2.0, 5.0)])

    assert row["requests"] == 4000
    assert row["rps"] == pytest.approx(2000)
    assert row["cpu_us_per_request"] == pytest.approx(150.0)
    assert (row["cpu_us_min"], row["cpu_us_max"]) == pytest.approx((133.33, 200.0), rel=1e-3)
    assert (row["p50_ms"], row["p99_ms"]) == (1.5, 4.0)


def test_ratios_are_policies_over_bare_and_none_without_a_baseline() -> None:
    policies = {"rps": 900.0, "p50_ms": 2.2, "p99_ms": 4.0, "cpu_us_per_request": 110.0}
    bare = {"rps": 1000.0, "p50_ms": 2.0, "p99_ms": 0.0, "cpu_us_per_request": 100.0}

    result = ratios(policies, bare)

    assert result["rps"] == pytest.approx(0.9)
    assert result["cpu_us_per_request"] == pytest.approx(1.1)
    assert result["p99_ms"] is None


def test_breaker_counts_as_open_only_while_it_refuses() -> None:
    assert is_open({"state": "open", "open_remaining": 29.5})
    assert not is_open({"state": "open", "open_remaining": 0})
    assert not is_open({"state": "half_open", "open_remaining": 0})
    assert not is_open({"state": "disabled"})


def test_failure_checks_judge_the_breaker_p99_and_the_plain_timeout() -> None:
    runs = {
        "breaker": {"p99_ms": 3.1, "p50_ms": 0.8},
        "breaker+fallback": {"p99_ms": 6.0, "p50_ms": 1.1},
        "no-breaker": {"p99_ms": 1004.0, "p50_ms": 1001.0},
    }

    verdicts = [c["passed"] for c in failure_checks(runs)]

    assert verdicts == [True, False, True]


def test_policy_work_is_timed_per_call() -> None:
    per_call = policy_call_ns(number=1000)

    assert set(per_call) == {"breaker", "bulkhead"}
    assert all(0 < ns < 1e6 for ns in per_call.values())


def _result() -> dict[str, Any]:
    policies = combine([_round(10_000, 1.0, 1.1, 2.0, 6.0)])
    bare = combine([_round(10_500, 1.0, 1.0, 1.9, 5.5)])

    def failure_run(p99: float, status: int, reason: str | None, fallback: str | None) -> Any:
        return {
            "requests": 5000,
            "p50_ms": p99 * 0.998,
            "p90_ms": p99 * 0.999,
            "p99_ms": p99,
            "opened": None if status == 504 else {"calls": 12, "seconds": 1.1},
            "sample": {
                "status": status,
                "reason": reason,
                "fallback": fallback,
                "breaker": {"state": "disabled" if status == 504 else "open"},
            },
        }

    runs = {
        "breaker": failure_run(2.5, 503, "circuit_open", None),
        "breaker+fallback": failure_run(2.8, 200, None, "circuit_open"),
        "no-breaker": failure_run(1003.0, 504, "timeout", None),
    }
    return {
        "plan": QUICK.__dict__,
        "machine": {
            "nproc": 2,
            "cpu": "Test CPU",
            "kernel": "Linux 6",
            "python": "3.11",
            "aiohttp": "3.9",
            "wrk": "wrk 4.1.0",
            "loadavg_at_start": ["0.1", "0.2", "0.3"],
        },
        "loadavg_at_end": ["1.0", "1.0", "1.0"],
        "cost": {
            "connections": 50,
            "config": COST_VARIANTS,
            "variants": {"policies": policies, "bare": bare},
            "ratio": ratios(policies, bare),
            "policy_call_ns": {"breaker": 850.0, "bulkhead": 90.0},
        },
        "hard_failure": {
            "connections": 10,
            "seconds": 3,
            "runs": runs,
            "checks": failure_checks(runs),
        },
    }


def test_report_shows_the_ratio_and_both_failure_latencies() -> None:
    text = markdown(_result())

    assert "- machine: 2 cores, Test CPU" in text
    assert "| **(a) / (b)** | 0.952x |" in text
    assert "**1.155x**" in text  # CPU: 110 / 95.2 us
    assert "| 2.50 | 503 circuit_open | open | 12 calls, 1.1 s |" in text
    assert "200 fallback circuit_open" in text
    assert "| 1003.00 | 504 timeout | disabled | - |" in text
    assert text.count("PASS") == 3
