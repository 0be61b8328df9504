"""The performance issue's one table: each target judged from a run's saved numbers."""

from __future__ import annotations

import pytest

from bench import report


def _run(target: str, connections: int, rps: float, cpu: float, p50: float) -> dict[str, object]:
    return {
        "target": target,
        "connections": connections,
        "rps": rps,
        "cpu_us_per_request": cpu,
        "p50_ms": p50,
    }


def test_each_sidecar_is_judged_against_the_minimal_proxy_on_its_own_loop() -> None:
    runs = [
        _run("direct", 1, 9000, 40, 0.10),
        _run("minimal-asyncio", 50, 2000, 400, 20),
        _run("sidecar-asyncio", 50, 2700, 300, 15),
        _run("minimal-uvloop", 50, 3000, 300, 14),
        _run("sidecar", 50, 3600, 250, 12),
        _run("minimal-asyncio", 1, 1700, 480, 0.55),
        _run("sidecar-asyncio", 1, 1600, 470, 0.54),
        _run("minimal-uvloop", 1, 1800, 460, 0.50),
        _run("sidecar", 1, 1700, 450, 0.52),
    ]
    verdicts = {c.name: c.passed for c in report.proxy_checks(runs)}
    assert verdicts == {
        "proxy rps @50 conns, sidecar / minimal aiohttp proxy (asyncio)": True,  # 1.35x
        "proxy server CPU per request @50 conns, sidecar / minimal (asyncio)": True,  # 0.75x
        "proxy added p50 @1 conn over direct, sidecar vs minimal (asyncio)": True,
        "proxy rps @50 conns, sidecar / minimal aiohttp proxy (uvloop)": False,  # 1.2x
        "proxy server CPU per request @50 conns, sidecar / minimal (uvloop)": False,  # 0.83x
        "proxy added p50 @1 conn over direct, sidecar vs minimal (uvloop)": False,
    }


def test_tracing_is_judged_against_its_control_when_it_has_one() -> None:
    tracing = {
        "variants": {
            "always-off": {"cpu_vs_off": 0.02},
            "unsampled-parent": {"cpu_vs_off": 0.09, "cpu_vs_control_paired": 0.03},
        }
    }
    checks = report.tracing_checks(tracing)
    assert [(c.measured, c.passed) for c in checks] == [("+2.0%", True), ("+3.0%", True)]


def test_checkout_rows_become_checks_and_a_missing_store_is_not_a_pass() -> None:
    rows = [
        {"store": "memory", "p50_over_gather_ms": 1.2, "target_ms": 3.0, "pass": True},
        {"store": "redis", "p50_over_gather_ms": None, "target_ms": 3.0, "pass": False},
    ]
    checks = report.checkout_checks(rows)
    assert [(c.measured, c.verdict) for c in checks] == [("+1.2 ms", "PASS"), ("n/a", "MISS")]
    assert "1 of 2 targets met." in report.issue14_markdown(checks, "make bench")


def test_tracing_prefers_the_round_by_round_ratio_to_off() -> None:
    tracing = {"variants": {"always-off": {"cpu_vs_off": 0.30, "cpu_vs_off_paired": 0.01}}}
    [check] = report.tracing_checks(tracing)
    assert (check.measured, check.passed) == ("+1.0%", True)


def test_paired_cost_is_the_median_of_each_rounds_ratio() -> None:
    from bench.tracing_cost import paired_cost

    def rows(*cpu: float) -> list[dict[str, float]]:
        return [{"cpu_us_per_request": c} for c in cpu]

    # ratios 0, +1.0%, +28.8% (a round where `off` alone met a quiet moment): the median
    # is +1.0%, where the medians of each side apart would give 103 / 100 - 1 = +3%
    cost = paired_cost(rows(100, 200, 103), rows(100, 198, 80))
    assert cost == pytest.approx(200 / 198 - 1)


def test_each_round_rotates_the_order_and_keeps_a_control_before_its_variant() -> None:
    from bench.tracing_cost import _round_order

    names = ["off", "always-off", "off-parent", "unsampled-parent", "on"]
    orders = [_round_order(names, n) for n in range(4)]
    assert [order[0] for order in orders] == ["off", "always-off", "off-parent", "on"]
    for order in orders:
        assert sorted(order) == sorted(names)
        assert order.index("off-parent") + 1 == order.index("unsampled-parent")


def test_proxy_ratios_pair_the_rounds_when_both_rows_have_them() -> None:
    def row(target: str, rps: list[float]) -> dict[str, object]:
        rounds = [{"rps": r, "cpu_us_per_request": 1e6 / r} for r in rps]
        median = sorted(rps)[1]
        return {
            "target": target,
            "connections": 50,
            "rps": median,
            "cpu_us_per_request": 1e6 / median,
            "rounds": rounds,
        }

    # the machine halved its speed in the last round, for both proxies alike
    sidecar = row("sidecar-asyncio", [1400, 1400, 700])
    minimal = row("minimal-asyncio", [1000, 1000, 500])
    assert report.paired_ratio(sidecar, minimal, "rps") == pytest.approx(1.4)
    checks = {c.name: c for c in report.proxy_checks([sidecar, minimal])}
    rps = checks["proxy rps @50 conns, sidecar / minimal aiohttp proxy (asyncio)"]
    assert rps.passed is True and rps.measured.startswith("1.40x")


def test_the_proxy_rounds_rotate_and_keep_each_pair_together() -> None:
    from bench.run import round_order

    orders = [round_order(n) for n in range(3)]
    assert [o[0] for o in orders] == ["direct", "minimal-asyncio", "minimal-uvloop"]
    for order in orders:
        assert order.index("minimal-asyncio") + 1 == order.index("sidecar-asyncio")
        assert order.index("minimal-uvloop") + 1 == order.index("sidecar")


def test_tracing_is_judged_by_instructions_when_the_run_counted_them() -> None:
    tracing = {
        "variants": {
            "always-off": {"cpu_vs_off": 0.30, "instructions_vs_off": 0.012},
            "unsampled-parent": {
                "cpu_vs_off": 0.01,
                "instructions_vs_off": 0.07,
                "instructions_vs_control": 0.061,
            },
        }
    }
    checks = report.tracing_checks(tracing)
    assert [(c.measured, c.passed) for c in checks] == [("+1.2%", True), ("+6.1%", False)]
    assert all("(instructions)" in c.name for c in checks)


def test_instruction_costs_are_against_off_and_the_control() -> None:
    from bench.tracing_cost import add_instruction_costs

    variants: dict[str, dict[str, float]] = {"off": {}, "unsampled-parent": {}}
    counts = {"off": 400e3, "off-parent": 410e3, "unsampled-parent": 420e3}
    add_instruction_costs(variants, counts)
    assert variants["off"]["instructions_vs_off"] == 0
    assert round(variants["unsampled-parent"]["instructions_vs_off"], 4) == 0.05
    assert round(variants["unsampled-parent"]["instructions_vs_control"], 4) == 0.0244
    assert "instructions_vs_control" not in variants["off-parent"]
