"""`rate_limit:` in the config: the rate's spelling, defaults, and a shared limit's store."""

from __future__ import annotations

import pytest

from proxy.config.model import SHARED_LIMIT_SCHEMES
from proxy.config.options import rate_limit_options
from proxy.config.values import format_rate
from proxy.policies import Policies
from proxy.resilience.clock import FakeClock
from proxy.storage.limits import RATE_LIMIT_BACKENDS
from tests.test_config import errors_of, valid, with_upstream


@pytest.mark.parametrize(
    ("text", "per_second"), [("100/s", 100.0), ("600/m", 10.0), ("0.5/s", 0.5), ("36/h", 0.01)]
)
def test_a_rate_is_calls_per_second_or_minute(text: str, per_second: float) -> None:
    config = valid(with_upstream(f"url: http://pay\nrate_limit: {{rate: {text}, burst: 20}}"))
    limit = config.upstreams["payment"].rate_limit
    assert limit is not None
    assert limit.rate == pytest.approx(per_second)
    assert (limit.burst, limit.scope, limit.on_store_down) == (20, "local", "refuse")


@pytest.mark.parametrize("text", ["100", "100/d", "fast", "-1/s", "0/s", "/s"])
def test_a_bad_rate_is_an_error_at_its_line(text: str) -> None:
    errors = errors_of(with_upstream(f"url: http://pay\nrate_limit:\n  rate: '{text}'"))
    assert len(errors) == 1
    assert errors[0].startswith("f.yaml:5 upstreams.payment.rate_limit.rate: ")
    assert "100/s" in errors[0]


def test_burst_and_scope_are_checked_at_their_lines() -> None:
    errors = errors_of(
        with_upstream("url: http://pay\nrate_limit:\n  rate: 5/s\n  burst: 0\n  scope: global")
    )
    assert any(e.startswith("f.yaml:6 upstreams.payment.rate_limit.burst: ") for e in errors)
    assert any(e.startswith("f.yaml:7 upstreams.payment.rate_limit.scope: ") for e in errors)


def test_defaults_give_every_upstream_the_limit_unless_it_sets_its_own() -> None:
    config = valid(
        """
        defaults:
          rate_limit: {rate: 50/s, burst: 5}
        upstreams:
          payment: {url: "http://pay", rate_limit: {rate: 10/s}}
          coupon: {url: "http://coupon"}
        """
    )
    payment, coupon = config.upstreams["payment"].rate_limit, config.upstreams["coupon"].rate_limit
    assert payment is not None and coupon is not None
    assert (payment.rate, payment.burst) == (10.0, 5)
    assert (coupon.rate, coupon.burst) == (50.0, 5)


def test_no_rate_limit_unless_configured() -> None:
    assert valid(with_upstream("url: http://pay")).upstreams["payment"].rate_limit is None


def test_a_shared_limit_needs_a_store_every_replica_reaches() -> None:
    errors = errors_of(
        "store: sqlite:///tmp/x.db\n"
        + with_upstream("url: http://pay\nrate_limit:\n  rate: 5/s\n  scope: shared")
    )
    assert errors == [
        "f.yaml:7 upstreams.payment.rate_limit.scope: shared needs a store every replica "
        "reaches: store is sqlite://, use redis://host:port/db (or scope: local)"
    ]
    valid(
        "store: redis://127.0.0.1:6379/0\n"
        + with_upstream("url: http://pay\nrate_limit: {rate: 5/s, scope: shared}")
    )


def test_the_config_and_the_opener_agree_on_the_shared_stores() -> None:
    assert set(SHARED_LIMIT_SCHEMES) == set(RATE_LIMIT_BACKENDS)


def test_the_rate_is_shown_as_written_and_becomes_the_policys_options() -> None:
    assert [format_rate(r) for r in (100.0, 0.5, 1 / 3600, 2.5)] == [
        "100/s",
        "30/m",
        "1/h",
        "150/m",
    ]
    config = valid(with_upstream("url: http://pay\nrate_limit: {rate: 600/m, burst: 3}"))
    section = config.upstreams["payment"].rate_limit
    assert section is not None
    options = rate_limit_options(section)
    assert (options.rate, options.burst, options.interval) == (10.0, 3, 0.1)
    assert config.model_dump(mode="json")["upstreams"]["payment"]["rate_limit"]["rate"] == "10/s"


def test_a_reload_keeps_the_bucket_unless_its_settings_changed() -> None:
    clock = FakeClock()
    before = valid(with_upstream("url: http://pay\nrate_limit: {rate: 5/s}"))
    same = valid(with_upstream("url: http://pay\nrate_limit: {rate: 5/s}\ntimeout: {total: 2s}"))
    changed = valid(with_upstream("url: http://pay\nrate_limit: {rate: 6/s}"))
    old = Policies.build(before.upstreams["payment"], clock, name="payment")
    kept = Policies.build(same.upstreams["payment"], clock, previous=old, name="payment")
    fresh = Policies.build(changed.upstreams["payment"], clock, previous=old, name="payment")
    assert old.limiter is not None
    assert kept.limiter is old.limiter
    assert fresh.limiter is not old.limiter and fresh.limiter is not None
    assert fresh.limiter.options.rate == 6.0


def test_a_shared_limit_without_a_store_is_a_clear_error() -> None:
    config = valid(
        "store: memory://\n"
        + with_upstream("url: http://pay\nrate_limit: {rate: 5/s, scope: shared}")
    )
    with pytest.raises(ValueError, match="'payment': a shared rate limit needs a store"):
        Policies.build(config.upstreams["payment"], FakeClock(), name="payment")
