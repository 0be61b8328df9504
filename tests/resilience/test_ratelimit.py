"""The rate limit's bucket arithmetic on a fake clock, and the limiters around it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.resilience.clock import FakeClock
from proxy.resilience.ratelimit import (
    BucketStoreUnavailable,
    LocalLimiter,
    RateLimitOptions,
    SharedAnswer,
    SharedLimiter,
    TokenBucket,
)

TEN_PER_SECOND = RateLimitOptions(rate=10.0, burst=3)


def test_a_burst_within_burst_passes_at_once() -> None:
    bucket = TokenBucket(TEN_PER_SECOND, FakeClock())
    answers = [bucket.reserve(max_wait=0.0) for _ in range(3)]
    assert all(a.granted and a.wait == 0.0 for a in answers)


def test_past_the_burst_a_call_that_cannot_wait_is_refused_with_the_time_to_the_next_token() -> (
    None
):
    bucket = TokenBucket(TEN_PER_SECOND, FakeClock())
    for _ in range(3):
        bucket.reserve(0.0)
    refused = bucket.reserve(max_wait=0.05)
    assert not refused.granted
    assert refused.retry_after == pytest.approx(0.1)
    assert "10/s" in refused.detail


def test_a_call_that_can_wait_reserves_its_token_and_is_told_how_long() -> None:
    bucket = TokenBucket(TEN_PER_SECOND, FakeClock())
    for _ in range(3):
        bucket.reserve(0.0)
    first = bucket.reserve(max_wait=1.0)
    second = bucket.reserve(max_wait=1.0)
    assert first.granted and first.wait == pytest.approx(0.1)
    assert second.granted and second.wait == pytest.approx(0.2)  # waiters queue, not share


def test_a_refusal_takes_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(TEN_PER_SECOND, clock)
    for _ in range(3):
        bucket.reserve(0.0)
    for _ in range(50):
        assert not bucket.reserve(0.01).granted
    clock.advance(0.1)
    assert bucket.reserve(0.0).granted


def test_the_bucket_refills_at_the_rate_up_to_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(TEN_PER_SECOND, clock)
    for _ in range(3):
        bucket.reserve(0.0)
    assert bucket.level() == pytest.approx(0.0)
    clock.advance(0.2)
    assert bucket.level() == pytest.approx(2.0)
    clock.advance(60)
    assert bucket.level() == 3.0


def test_a_pause_grants_nothing_until_it_ends_then_one_token_then_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(TEN_PER_SECOND, clock)
    bucket.pause(2.0)
    refused = bucket.reserve(max_wait=1.0)
    assert not refused.granted
    assert refused.retry_after == pytest.approx(2.0)
    clock.advance(2.0)
    assert bucket.reserve(0.0).granted
    assert not bucket.reserve(0.0).granted  # from empty: no burst right after "slow down"
    clock.advance(0.1)
    assert bucket.reserve(0.0).granted


def test_a_shorter_pause_never_shortens_a_longer_one() -> None:
    clock = FakeClock()
    bucket = TokenBucket(TEN_PER_SECOND, clock)
    bucket.pause(5.0)
    bucket.pause(1.0)
    assert bucket.reserve(0.0).retry_after == pytest.approx(5.0)


def test_options_refuse_a_rate_or_burst_that_could_never_grant() -> None:
    with pytest.raises(ValueError, match="rate"):
        RateLimitOptions(rate=0.0)
    with pytest.raises(ValueError, match="burst"):
        RateLimitOptions(rate=1.0, burst=0)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.5, 500.0),
    burst=st.integers(1, 50),
    steps=st.lists(
        st.tuples(st.floats(0.0, 0.5), st.floats(0.0, 2.0), st.booleans()),
        min_size=1,
        max_size=300,
    ),
)
def test_never_more_than_burst_plus_rate_times_t_granted_over_any_interval(
    rate: float, burst: int, steps: list[tuple[float, float, bool]]
) -> None:
    """Grants land at `now + wait`; within any window of length t there are at most
    burst + rate * t of them, whatever the arrivals, waits and pauses."""
    clock = FakeClock()
    bucket = TokenBucket(RateLimitOptions(rate=rate, burst=burst), clock)
    granted_at: list[float] = []
    for gap, max_wait, pause in steps:
        clock.advance(gap)
        if pause and gap > 0.4:
            bucket.pause(gap)
        answer = bucket.reserve(max_wait)
        if answer.granted:
            granted_at.append(clock.now + answer.wait)
    granted_at.sort()
    for i, start in enumerate(granted_at):
        for j in range(i, len(granted_at)):
            t = granted_at[j] - start
            assert j - i + 1 <= burst + rate * t + 1e-6


# -- the limiters ---------------------------------------------------------------------


async def test_the_local_limiter_is_the_bucket_behind_the_protocol() -> None:
    limiter = LocalLimiter(TEN_PER_SECOND, FakeClock())
    assert all([(await limiter.acquire(0.0)).granted for _ in range(3)])
    assert not (await limiter.acquire(0.0)).granted
    await limiter.pause(1.0)
    assert (await limiter.acquire(0.5)).retry_after == pytest.approx(1.0)
    assert limiter.level() == 0.0


class FlakyStore:
    """A `BucketStore` that answers from a bucket, or is down."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.down = False
        self.buckets: dict[str, TokenBucket] = {}
        self.pauses: list[float] = []

    async def take(self, key: str, options: RateLimitOptions, max_wait: float) -> SharedAnswer:
        if self.down:
            raise BucketStoreUnavailable("redis://store: ConnectionError")
        bucket = self.buckets.setdefault(key, TokenBucket(options, self.clock))
        answer = bucket.reserve(max_wait)
        wait = answer.wait if answer.granted else answer.retry_after
        return SharedAnswer(answer.granted, wait, bucket.level())

    async def pause(self, key: str, options: RateLimitOptions, seconds: float) -> None:
        if self.down:
            raise BucketStoreUnavailable("redis://store: ConnectionError")
        self.pauses.append(seconds)
        self.buckets.setdefault(key, TokenBucket(options, self.clock)).pause(seconds)

    async def close(self) -> None:
        return None


async def test_two_shared_limiters_on_one_key_share_one_bucket() -> None:
    clock = FakeClock()
    store = FlakyStore(clock)
    a = SharedLimiter(store, "payment", TEN_PER_SECOND, clock)
    b = SharedLimiter(store, "payment", TEN_PER_SECOND, clock)
    granted = [(await limiter.acquire(0.0)).granted for limiter in (a, b, a, b)]
    assert granted == [True, True, True, False]
    assert a.level() == pytest.approx(0.0)  # as a last saw it: its grant took the last one


async def test_the_shared_limiter_fails_closed_when_its_store_is_down() -> None:
    clock = FakeClock()
    store = FlakyStore(clock)
    store.down = True
    limiter = SharedLimiter(store, "payment", TEN_PER_SECOND, clock)
    answer = await limiter.acquire(1.0)
    assert not answer.granted and answer.store_down
    assert answer.retry_after == 1.0
    assert "rate limit store unavailable" in answer.detail


async def test_on_store_down_allow_lets_calls_through_and_says_so() -> None:
    clock = FakeClock()
    store = FlakyStore(clock)
    store.down = True
    options = RateLimitOptions(rate=10.0, burst=3, scope="shared", on_store_down="allow")
    answer = await SharedLimiter(store, "payment", options, clock).acquire(1.0)
    assert answer.granted and answer.store_down and answer.wait == 0.0


async def test_a_shared_pause_holds_this_replica_even_when_the_store_missed_it() -> None:
    clock = FakeClock()
    store = FlakyStore(clock)
    limiter = SharedLimiter(store, "payment", TEN_PER_SECOND, clock)
    store.down = True
    await limiter.pause(2.0)  # never raises
    store.down = False
    refused = await limiter.acquire(1.0)
    assert not refused.granted and refused.retry_after == pytest.approx(2.0)
    waited = await limiter.acquire(3.0)  # the store grants now; the local pause still holds
    assert waited.granted and waited.wait == pytest.approx(2.0)
