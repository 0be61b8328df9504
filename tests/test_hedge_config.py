"""The `hedge:` section: how `after` is read, defaults merged, state kept over a reload."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config.loader import validate_text
from proxy.config.options import hedge_options
from proxy.policies import Policies
from proxy.resilience.clock import FakeClock
from tests.conftest import make_config

URL = "http://127.0.0.1:9"


def _upstream(hedge: Any, defaults: dict[str, Any] | None = None) -> Any:
    data: dict[str, Any] = {"upstreams": {"catalog": {"url": URL, "hedge": hedge}}}
    if defaults is not None:
        data["defaults"] = defaults
    return make_config(data).upstreams["catalog"]


def test_a_fixed_after_is_a_duration() -> None:
    options = hedge_options(_upstream({"after": "50ms"}).hedge)
    assert options.after == pytest.approx(0.05)
    assert options.max_extra == 1
    assert options.budget.ratio == pytest.approx(0.05)


@pytest.mark.parametrize(("written", "quantile"), [("p95", 0.95), ("p99.9", 0.999), ("p50", 0.5)])
def test_a_quantile_after_is_read_as_one(written: str, quantile: float) -> None:
    options = hedge_options(_upstream({"after": written}).hedge)
    assert options.after is None
    assert options.quantile == pytest.approx(quantile)


def test_the_default_after_is_p95_with_a_50ms_fallback() -> None:
    options = hedge_options(_upstream({}).hedge)
    assert options.after is None and options.quantile == pytest.approx(0.95)
    assert options.fallback_after == pytest.approx(0.05)


@pytest.mark.parametrize("bad", ["fast", "p100", "p20", "0ms", "50"])
def test_a_bad_after_names_the_field_and_the_ways_to_write_it(bad: str) -> None:
    text = f"upstreams:\n  catalog:\n    url: {URL}\n    hedge:\n      after: '{bad}'\n"
    config, errors = validate_text(text, "test.yaml", env={})
    assert config is None
    message = "\n".join(str(e) for e in errors)
    assert "upstreams.catalog.hedge.after" in message
    assert "test.yaml:5" in message


def test_hedging_from_defaults_merges_with_the_upstreams_own() -> None:
    upstream = _upstream({"max_extra": 2}, defaults={"hedge": {"after": "30ms"}})
    options = hedge_options(upstream.hedge)
    assert options.after == pytest.approx(0.03)
    assert options.max_extra == 2


def test_no_hedge_section_means_no_hedging() -> None:
    config = make_config({"upstreams": {"catalog": {"url": URL}}})
    assert Policies.build(config.upstreams["catalog"], FakeClock()).hedging is None


def test_a_reload_keeps_the_learned_latency_while_the_section_is_unchanged() -> None:
    clock = FakeClock()
    before = Policies.build(_upstream({"after": "p95"}), clock)
    assert before.hedging is not None
    kept = Policies.build(_upstream({"after": "p95"}), clock, previous=before)
    assert kept.hedging is before.hedging
    changed = Policies.build(_upstream({"after": "p99"}), clock, previous=before)
    assert changed.hedging is not before.hedging
