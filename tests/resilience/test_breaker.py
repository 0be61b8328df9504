"""Breaker behaviour, driven by a FakeClock: no test sleeps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.resilience.breaker import (
    Breaker,
    BreakerOptions,
    Permit,
    RollingCounts,
    is_failure,
)
from proxy.resilience.clock import FakeClock
from proxy.resilience.outcome import Kind, Outcome


def make(
    clock: FakeClock | None = None, transitions: list[tuple[str, str]] | None = None, **kw: object
) -> tuple[Breaker, FakeClock]:
    opts = {"min_calls": 4, "failure_rate": 0.5, "open_for": 5.0, "half_open_probes": 3}
    opts.update(kw)
    clock = clock or FakeClock()
    hook = (lambda old, new: transitions.append((old, new))) if transitions is not None else None
    return Breaker(BreakerOptions(**opts), clock=clock, on_transition=hook), clock


def call(breaker: Breaker, success: bool, duration: float = 0.01) -> bool:
    """One call through the bool API; returns whether it was let through."""
    if not breaker.acquire():
        return False
    breaker.record(success, duration)
    return True


def trip(breaker: Breaker) -> None:
    for _ in range(breaker.options.min_calls):
        call(breaker, False)
    assert breaker.state == "open"


def to_half_open(breaker: Breaker, clock: FakeClock) -> None:
    trip(breaker)
    clock.advance(breaker.options.open_for)
    assert breaker.state == "half_open"


# -- classification -------------------------------------------------------------------


@pytest.mark.parametrize("kind", [Kind.TIMEOUT, Kind.CONNECT_FAILURE, Kind.RESET])
def test_network_failures_are_failures(kind: Kind) -> None:
    assert is_failure(Outcome(kind))


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599])
def test_5xx_are_failures_by_default(status: int) -> None:
    assert is_failure(Outcome(Kind.RESPONSE, status=status))


@pytest.mark.parametrize("status", [200, 204, 301, 400, 404, 409, 422, 429])
def test_2xx_3xx_4xx_are_successes(status: int) -> None:
    assert not is_failure(Outcome(Kind.RESPONSE, status=status))


def test_failure_statuses_are_configurable() -> None:
    statuses = frozenset({502, 503, 504})
    assert not is_failure(Outcome(Kind.RESPONSE, status=500), statuses)
    assert is_failure(Outcome(Kind.RESPONSE, status=503), statuses)


@pytest.mark.parametrize("kind", [Kind.CIRCUIT_OPEN, Kind.BULKHEAD_FULL])
def test_sidecar_refusals_are_not_upstream_failures(kind: Kind) -> None:
    assert not is_failure(Outcome(kind))


def test_4xx_responses_do_not_trip_the_breaker() -> None:
    breaker, _ = make()
    for _ in range(50):
        call(breaker, not is_failure(Outcome(Kind.RESPONSE, status=404)))
    assert breaker.state == "closed"
    assert breaker.snapshot()["failure_rate"] == 0.0


# -- options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"window": 0},
        {"buckets": 0},
        {"min_calls": 0},
        {"failure_rate": 0},
        {"failure_rate": 1.5},
        {"slow_call_duration": 0},
        {"slow_call_rate": 0},
        {"open_for": -1},
        {"half_open_probes": 0},
    ],
)
def test_invalid_options_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerOptions(**bad)


# -- closed: the window ---------------------------------------------------------------


def test_failure_rate_trips_the_breaker() -> None:
    breaker, _ = make(min_calls=4, failure_rate=0.5)
    call(breaker, True)
    call(breaker, True)
    call(breaker, False)
    assert breaker.state == "closed"
    call(breaker, False)  # 2 of 4 = 50 %
    assert breaker.state == "open"


def test_failure_rate_below_threshold_stays_closed() -> None:
    breaker, _ = make(min_calls=4, failure_rate=0.5)
    for success in (True, True, True, False, True, True, False):
        call(breaker, success)
    assert breaker.state == "closed"


def test_min_calls_respected_before_tripping() -> None:
    breaker, _ = make(min_calls=5)
    for _ in range(4):
        call(breaker, False)
    assert breaker.state == "closed"  # 100 % failures, but only 4 calls
    call(breaker, False)
    assert breaker.state == "open"


def test_exact_rate_threshold_trips_despite_float_rounding() -> None:
    breaker, _ = make(min_calls=10, failure_rate=0.3)
    for success in [False] * 3 + [True] * 7:
        call(breaker, success)
    assert breaker.state == "open"


def test_window_sliding_drops_old_calls() -> None:
    breaker, clock = make(min_calls=4, window=10.0, buckets=10)
    for _ in range(3):
        call(breaker, False)
    clock.advance(10.0)  # those three failures leave the window
    call(breaker, False)
    snap = breaker.snapshot()
    assert snap["calls_in_window"] == 1
    assert breaker.state == "closed"


def test_window_keeps_calls_younger_than_the_window() -> None:
    breaker, clock = make(min_calls=4, window=10.0, buckets=10)
    for _ in range(3):
        call(breaker, False)
    clock.advance(8.5)
    call(breaker, False)
    assert breaker.state == "open"


def test_window_drops_buckets_one_by_one() -> None:
    breaker, clock = make(min_calls=100, window=10.0, buckets=10)
    for _ in range(10):
        call(breaker, False)
        clock.advance(1.0)
    # The oldest bucket left with the last advance; nine one-second buckets remain.
    assert breaker.snapshot()["calls_in_window"] == 9
    clock.advance(4.0)
    assert breaker.snapshot()["calls_in_window"] == 5


def test_slow_calls_trip_the_breaker() -> None:
    breaker, _ = make(min_calls=4, slow_call_duration=1.0, slow_call_rate=0.5)
    call(breaker, True, 0.1)
    call(breaker, True, 0.1)
    call(breaker, True, 1.5)
    assert breaker.state == "closed"
    call(breaker, True, 2.0)  # all succeeded, but 2 of 4 were slow
    assert breaker.state == "open"


def test_slow_calls_ignored_without_slow_call_duration() -> None:
    breaker, _ = make(min_calls=4, slow_call_duration=None)
    for _ in range(10):
        call(breaker, True, 60.0)
    assert breaker.state == "closed"
    assert breaker.snapshot()["slow_rate"] == 0.0


def test_disabled_breaker_never_opens() -> None:
    breaker, _ = make(enabled=False)
    for _ in range(100):
        assert call(breaker, False)
    assert breaker.state == "closed"


# -- open -----------------------------------------------------------------------------


def test_open_refuses_until_open_for_elapses() -> None:
    breaker, clock = make(open_for=5.0)
    trip(breaker)
    assert not breaker.acquire()
    clock.advance(4.999)
    assert not breaker.acquire()
    clock.advance(0.001)
    assert breaker.acquire()
    assert breaker.state == "half_open"


def test_retry_after_counts_down_while_open() -> None:
    breaker, clock = make(open_for=5.0)
    assert breaker.retry_after() == 0.0
    trip(breaker)
    assert breaker.retry_after() == pytest.approx(5.0)
    clock.advance(2.0)
    assert breaker.retry_after() == pytest.approx(3.0)
    clock.advance(3.0)
    assert breaker.retry_after() == 0.0


def test_results_of_calls_started_before_opening_are_ignored_while_open() -> None:
    breaker, _ = make()
    late = breaker.try_acquire()
    assert late is not None
    trip(breaker)
    late.record(True, 0.01)
    assert breaker.state == "open"


# -- half-open ------------------------------------------------------------------------


def test_half_open_allows_only_configured_probes() -> None:
    breaker, clock = make(half_open_probes=3)
    to_half_open(breaker, clock)
    assert [breaker.acquire() for _ in range(4)] == [True, True, True, False]


def test_half_open_probe_slots_are_not_refilled_by_successes() -> None:
    breaker, clock = make(half_open_probes=3)
    to_half_open(breaker, clock)
    assert call(breaker, True)
    assert call(breaker, True)
    assert breaker.state == "half_open"
    assert breaker.acquire()  # the third and last probe
    assert not breaker.acquire()


def test_all_probes_succeed_closes_the_breaker() -> None:
    breaker, clock = make(half_open_probes=3)
    to_half_open(breaker, clock)
    for _ in range(3):
        assert call(breaker, True)
    assert breaker.state == "closed"


def test_closing_starts_with_a_fresh_window() -> None:
    breaker, clock = make(half_open_probes=1)
    to_half_open(breaker, clock)
    call(breaker, True)
    assert breaker.snapshot()["calls_in_window"] == 0
    call(breaker, False)  # one failure in a fresh window is below min_calls
    assert breaker.state == "closed"


def test_any_probe_failure_opens_again() -> None:
    breaker, clock = make(half_open_probes=3)
    to_half_open(breaker, clock)
    call(breaker, True)
    call(breaker, False)
    assert breaker.state == "open"
    assert not breaker.acquire()


def test_probe_failure_starts_a_fresh_open_period() -> None:
    breaker, clock = make(open_for=5.0)
    to_half_open(breaker, clock)
    clock.advance(3.0)
    call(breaker, False)
    assert breaker.retry_after() == pytest.approx(5.0)


def test_slow_probe_counts_as_failure() -> None:
    breaker, clock = make(slow_call_duration=1.0)
    to_half_open(breaker, clock)
    call(breaker, True, 1.0)
    assert breaker.state == "open"


def test_release_frees_a_probe_slot() -> None:
    breaker, clock = make(half_open_probes=3)
    to_half_open(breaker, clock)
    assert all(breaker.acquire() for _ in range(3))
    assert not breaker.acquire()
    breaker.release()  # one probe was cancelled before it was sent
    assert breaker.acquire()
    assert not breaker.acquire()


def test_released_probes_cannot_leave_the_breaker_stuck_half_open() -> None:
    breaker, clock = make(half_open_probes=3)
    to_half_open(breaker, clock)
    for _ in range(3):
        assert breaker.acquire()
        breaker.release()
    for _ in range(3):
        assert call(breaker, True)
    assert breaker.state == "closed"


def test_permit_settles_only_once() -> None:
    breaker, clock = make(half_open_probes=2)
    to_half_open(breaker, clock)
    permit = breaker.try_acquire()
    assert isinstance(permit, Permit)
    permit.record(True, 0.01)
    permit.release()  # the pipeline's `finally`: a no-op after record
    assert permit.settled
    assert breaker.acquire()
    assert not breaker.acquire()  # the success still holds its slot


def test_stale_permit_cannot_free_a_probe_slot() -> None:
    breaker, clock = make(half_open_probes=3)
    from_closed = breaker.try_acquire()
    assert from_closed is not None
    to_half_open(breaker, clock)
    probes = [breaker.try_acquire() for _ in range(3)]
    assert all(probes)
    from_closed.release()  # started while closed: not a probe
    assert breaker.try_acquire() is None


def test_stale_permit_success_does_not_count_as_a_probe() -> None:
    breaker, clock = make(half_open_probes=1)
    from_closed = breaker.try_acquire()
    assert from_closed is not None
    to_half_open(breaker, clock)
    from_closed.record(True, 0.01)
    assert breaker.state == "half_open"


def test_bool_release_without_probe_out_is_ignored() -> None:
    breaker, clock = make(half_open_probes=2)
    to_half_open(breaker, clock)
    breaker.release()
    breaker.record(True, 0.01)
    assert [breaker.acquire() for _ in range(3)] == [True, True, False]


# -- manual control -------------------------------------------------------------------


def test_force_open_refuses_until_reset() -> None:
    breaker, clock = make()
    breaker.force_open()
    clock.advance(3600)
    assert not breaker.acquire()
    assert breaker.state == "open"
    breaker.reset()
    assert breaker.acquire()


def test_force_closed_ignores_the_window() -> None:
    breaker, _ = make(min_calls=4)
    breaker.force_closed()
    for _ in range(50):
        assert call(breaker, False)
    assert breaker.state == "closed"
    assert breaker.snapshot()["forced"] == "closed"


def test_force_closed_closes_an_open_breaker() -> None:
    breaker, _ = make()
    trip(breaker)
    breaker.force_closed()
    assert breaker.acquire()


def test_reset_closes_with_empty_window_and_no_override() -> None:
    breaker, _ = make(min_calls=4)
    breaker.force_closed()
    for _ in range(3):
        call(breaker, False)
    breaker.reset()
    snap = breaker.snapshot()
    assert snap["state"] == "closed"
    assert snap["forced"] is None
    assert snap["calls_in_window"] == 0
    trip(breaker)  # the window counts again


def test_reset_of_an_open_breaker_closes_it() -> None:
    breaker, _ = make()
    trip(breaker)
    breaker.reset()
    assert breaker.state == "closed"
    assert breaker.retry_after() == 0.0


# -- telemetry ------------------------------------------------------------------------


def test_on_transition_sequence() -> None:
    transitions: list[tuple[str, str]] = []
    breaker, clock = make(transitions=transitions, half_open_probes=1)
    trip(breaker)
    clock.advance(5.0)
    call(breaker, False)  # probe fails
    clock.advance(5.0)
    call(breaker, True)  # probe succeeds
    breaker.force_open()
    breaker.force_open()  # no change, no event
    breaker.reset()
    assert transitions == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
        ("closed", "open"),
        ("open", "closed"),
    ]


def test_snapshot_values_while_closed() -> None:
    breaker, _ = make(min_calls=10, slow_call_duration=1.0)
    call(breaker, True, 0.1)
    call(breaker, True, 2.0)
    call(breaker, False, 0.1)
    call(breaker, False, 3.0)
    assert breaker.snapshot() == {
        "state": "closed",
        "failure_rate": 0.5,
        "slow_rate": 0.5,
        "calls_in_window": 4,
        "open_remaining": 0.0,
        "forced": None,
        "probes_in_flight": 0,
    }


def test_snapshot_values_while_open() -> None:
    breaker, clock = make(min_calls=4, open_for=5.0)
    trip(breaker)
    clock.advance(1.5)
    snap = breaker.snapshot()
    assert snap["state"] == "open"
    assert snap["failure_rate"] == 1.0
    assert snap["calls_in_window"] == 4
    assert snap["open_remaining"] == pytest.approx(3.5)


def test_snapshot_counts_probes_in_flight() -> None:
    breaker, clock = make(half_open_probes=3)
    to_half_open(breaker, clock)
    breaker.acquire()
    breaker.acquire()
    assert breaker.snapshot()["probes_in_flight"] == 2


def test_forced_open_retry_after_is_open_for() -> None:
    breaker, _ = make(open_for=7.0)
    breaker.force_open()
    assert breaker.retry_after() == 7.0
    assert breaker.snapshot()["forced"] == "open"


# -- the rolling window ---------------------------------------------------------------


def test_rolling_counts_long_gap_clears_everything() -> None:
    clock = FakeClock()
    counts = RollingCounts(10.0, 10, 2, clock)
    counts.add(3, 1)
    clock.advance(1e6)
    assert counts.totals() == (0, 0)
    counts.add(1, 0)
    assert counts.totals() == (1, 0)


# -- the half-open invariant, whatever the sequence ------------------------------------

_acquire = st.just(("acquire",))
_record = st.tuples(st.just("record"), st.integers(0, 20), st.booleans(), st.floats(0, 3))
_ops = st.lists(
    st.one_of(
        _acquire,
        _acquire,
        _acquire,
        _record,
        _record,
        st.tuples(st.just("release"), st.integers(0, 20)),
        st.tuples(st.just("advance"), st.floats(0, 12)),
        st.sampled_from([("force_open",), ("force_closed",), ("reset",)]),
    ),
    max_size=120,
)
"""Random call traffic; each run starts half-open so the interesting state is reached."""


@settings(max_examples=300, deadline=None)
@given(ops=_ops, probes=st.integers(1, 4), slow=st.sampled_from([None, 1.0]))
def test_half_open_never_lets_more_than_probes_through(
    ops: list[tuple], probes: int, slow: float | None
) -> None:
    """Real calls: each granted permit is settled at most once, in any order.

    Counts the calls let through during one half-open period that are not released;
    they may never exceed `half_open_probes`, even with calls from earlier states
    settling in the middle of it.
    """
    clock = FakeClock()
    episode: dict[str, int] = {"through": 0}
    outstanding: list[tuple[Permit, bool]] = []  # (permit, granted while half-open)

    def on_transition(old: str, new: str) -> None:
        episode["through"] = 0
        for i, (permit, _) in enumerate(outstanding):
            outstanding[i] = (permit, False)  # now from an older state

    breaker = Breaker(
        BreakerOptions(
            min_calls=3,
            half_open_probes=probes,
            open_for=5.0,
            window=10.0,
            slow_call_duration=slow,
        ),
        clock=clock,
        on_transition=on_transition,
    )
    to_half_open(breaker, clock)
    for op in ops:
        name = op[0]
        if name == "acquire":
            half_open = breaker.state == "half_open"
            permit = breaker.try_acquire()
            if permit is not None:
                outstanding.append((permit, half_open))
                if half_open:
                    episode["through"] += 1
        elif name in ("record", "release") and outstanding:
            permit, probe = outstanding.pop(op[1] % len(outstanding))
            if name == "record":
                permit.record(op[2], op[3])
            else:
                if probe:
                    episode["through"] -= 1
                permit.release()
        elif name == "advance":
            clock.advance(op[1])
        elif name in ("force_open", "force_closed", "reset"):
            getattr(breaker, name)()
        if breaker.state == "half_open":
            assert episode["through"] <= probes


@settings(max_examples=300, deadline=None)
@given(ops=_ops, probes=st.integers(1, 4))
def test_half_open_bool_api_grants_at_most_probes_plus_releases(
    ops: list[tuple], probes: int
) -> None:
    """The bool API with arbitrary, even unmatched, record/release calls."""
    clock = FakeClock()
    counts = {"granted": 0, "released": 0}

    def on_transition(old: str, new: str) -> None:
        counts["granted"] = counts["released"] = 0

    breaker = Breaker(
        BreakerOptions(min_calls=3, half_open_probes=probes, open_for=5.0),
        clock=clock,
        on_transition=on_transition,
    )
    to_half_open(breaker, clock)
    for op in ops:
        name = op[0]
        if name == "acquire":
            half_open = breaker.state == "half_open"
            if breaker.acquire() and half_open:
                counts["granted"] += 1
        elif name == "record":
            breaker.record(op[2], op[3])
        elif name == "release":
            if breaker.state == "half_open":
                counts["released"] += 1
            breaker.release()
        elif name == "advance":
            clock.advance(op[1])
        else:
            getattr(breaker, name)()
        assert counts["granted"] <= probes + counts["released"]
