"""Fallback behaviour, driven by a FakeClock."""

from __future__ import annotations

import pytest

from proxy.resilience.clock import FakeClock
from proxy.resilience.fallback import (
    DEFAULT_ON,
    REASONS,
    CachedResponse,
    Fallback,
    FallbackOptions,
    StaleCache,
    StaticResponse,
)

STATIC = StaticResponse(
    status=200, headers={"Content-Type": "application/json"}, body=b'{"method":"standard"}'
)
GOOD = CachedResponse(status=200, headers=[("Content-Type", "application/json")], body=b"{}")


def make(**kw: object) -> tuple[Fallback, FakeClock]:
    clock = FakeClock()
    return Fallback(FallbackOptions(**kw), clock), clock


def test_default_reasons_are_all_but_reset() -> None:
    expected = {
        "timeout",
        "circuit_open",
        "bulkhead_full",
        "rate_limited",
        "store_unavailable",
        "retries_exhausted",
        "upstream_5xx",
        "connect_failure",
    }
    assert expected == DEFAULT_ON
    assert "reset" in REASONS
    assert FallbackOptions(on=frozenset({"reset"})).on == {"reset"}


def test_unknown_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="timout"):
        FallbackOptions(on=frozenset({"timout"}))


@pytest.mark.parametrize("bad", [{"stale_max_age": 0}, {"stale_max_entries": 0}])
def test_invalid_stale_options_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FallbackOptions(stale=True, **bad)


def test_static_answer_carries_reason_and_source() -> None:
    fallback, _ = make(static=STATIC)
    answer = fallback.answer("timeout", "/quote", "POST")
    assert answer is not None
    assert (answer.reason, answer.source) == ("timeout", "static")
    assert answer.status == 200
    assert answer.headers == [("Content-Type", "application/json")]
    assert answer.body == b'{"method":"standard"}'


def test_stale_first_then_static() -> None:
    fallback, _ = make(static=STATIC, stale=True)
    fallback.store_good("/quote?zip=1", GOOD)
    stale = fallback.answer("upstream_5xx", "/quote?zip=1", "GET")
    assert stale is not None and stale.source == "stale"
    assert stale.body == b"{}"
    other = fallback.answer("upstream_5xx", "/quote?zip=2", "GET")
    assert other is not None and other.source == "static"


def test_stale_only_for_get() -> None:
    fallback, _ = make(static=STATIC, stale=True)
    fallback.store_good("/quote", GOOD)
    answer = fallback.answer("timeout", "/quote", "POST")
    assert answer is not None and answer.source == "static"


def test_stale_method_match_ignores_case() -> None:
    fallback, _ = make(stale=True)
    fallback.store_good("/quote", GOOD)
    answer = fallback.answer("timeout", "/quote", "get")
    assert answer is not None and answer.source == "stale"


def test_no_key_skips_stale() -> None:
    fallback, _ = make(static=STATIC, stale=True)
    answer = fallback.answer("timeout", None, "GET")
    assert answer is not None and answer.source == "static"


def test_nothing_configured_answers_none() -> None:
    fallback, _ = make()
    assert fallback.answer("timeout", "/quote", "GET") is None


def test_reason_not_in_on_answers_none() -> None:
    fallback, _ = make(on=frozenset({"circuit_open"}), static=STATIC, stale=True)
    fallback.store_good("/quote", GOOD)
    assert fallback.answer("timeout", "/quote", "GET") is None
    assert fallback.answer("circuit_open", "/quote", "GET") is not None


def test_reset_is_not_answered_by_default() -> None:
    fallback, _ = make(static=STATIC)
    assert fallback.answer("reset", None, "GET") is None


def test_store_good_is_a_noop_without_stale() -> None:
    fallback, _ = make(stale=False)
    fallback.store_good("/quote", GOOD)
    assert fallback.answer("timeout", "/quote", "GET") is None


def test_stale_entry_expires_after_max_age() -> None:
    fallback, clock = make(stale=True, stale_max_age=60.0)
    fallback.store_good("/quote", GOOD)
    clock.advance(59.0)
    answer = fallback.answer("timeout", "/quote", "GET")
    assert answer is not None and answer.age == pytest.approx(59.0)
    clock.advance(1.0)
    assert fallback.answer("timeout", "/quote", "GET") is None


def test_newer_good_response_replaces_older() -> None:
    fallback, clock = make(stale=True, stale_max_age=60.0)
    fallback.store_good("/quote", GOOD)
    clock.advance(50.0)
    fallback.store_good("/quote", CachedResponse(200, [], b"new"))
    clock.advance(50.0)
    answer = fallback.answer("timeout", "/quote", "GET")
    assert answer is not None and answer.body == b"new"


def test_stale_cache_is_bounded() -> None:
    clock = FakeClock()
    cache = StaleCache(max_entries=2, max_age=60.0, clock=clock)
    cache.put("a", GOOD)
    cache.put("b", GOOD)
    cache.put("c", GOOD)
    assert len(cache) == 2
    assert cache.get("a") is None
    assert cache.get("c") == GOOD


def test_stale_cache_evicts_least_recently_used() -> None:
    clock = FakeClock()
    cache = StaleCache(max_entries=2, max_age=60.0, clock=clock)
    cache.put("a", GOOD)
    cache.put("b", GOOD)
    assert cache.get("a") == GOOD  # "a" is now the more recently used
    cache.put("c", GOOD)
    assert cache.get("b") is None
    assert cache.get("a") == GOOD


def test_stale_cache_ttl_follows_the_clock() -> None:
    clock = FakeClock()
    cache = StaleCache(max_entries=10, max_age=5.0, clock=clock)
    cache.put("a", GOOD)
    clock.advance(4.9)
    assert cache.get("a") == GOOD
    clock.advance(0.1)
    assert cache.get("a") is None
    assert len(cache) == 0


def test_answer_headers_are_a_copy() -> None:
    fallback, _ = make(stale=True)
    fallback.store_good("/quote", GOOD)
    answer = fallback.answer("timeout", "/quote", "GET")
    assert answer is not None
    answer.headers.append(("X-Sidecar-Fallback", "timeout"))
    assert GOOD.headers == [("Content-Type", "application/json")]
