import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.resilience.clock import FakeClock
from proxy.resilience.deadline import Deadline, InvalidTimeoutHeader, parse_timeout_header


def test_deadline_is_the_smaller_of_total_and_requested() -> None:
    clock = FakeClock()
    assert Deadline.for_call(3.0, 0.5, clock).remaining() == pytest.approx(0.5)
    assert Deadline.for_call(3.0, 10.0, clock).remaining() == pytest.approx(3.0)
    assert Deadline.for_call(3.0, None, clock).remaining() == pytest.approx(3.0)


def test_remaining_shrinks_with_time_and_never_goes_negative() -> None:
    clock = FakeClock()
    deadline = Deadline.after(1.0, clock)
    clock.advance(0.4)
    assert deadline.remaining() == pytest.approx(0.6)
    assert not deadline.expired
    clock.advance(5)
    assert deadline.remaining() == 0.0
    assert deadline.expired


def test_cap_shortens_a_wait_to_the_deadline() -> None:
    clock = FakeClock()
    deadline = Deadline.after(0.3, clock)
    assert deadline.cap(1.0) == pytest.approx(0.3)
    assert deadline.cap(0.1) == pytest.approx(0.1)


def test_within_never_extends_the_outer_deadline() -> None:
    clock = FakeClock()
    outer = Deadline.after(1.0, clock)
    assert outer.within(5.0).remaining() == pytest.approx(1.0)
    assert outer.within(0.2).remaining() == pytest.approx(0.2)


def test_header_value_rounds_down_to_whole_milliseconds() -> None:
    assert Deadline.header_value(0.2509) == "250"
    assert Deadline.header_value(0.0) == "0"


def test_timeout_header_is_parsed_as_milliseconds() -> None:
    assert parse_timeout_header(None) is None
    assert parse_timeout_header("250") == pytest.approx(0.25)
    assert parse_timeout_header(" 0 ") == 0.0


@pytest.mark.parametrize("bad", ["-5", "1.5", "abc", "", "1e3"])
def test_bad_timeout_header_is_refused(bad: str) -> None:
    with pytest.raises(InvalidTimeoutHeader, match="X-Request-Timeout-Ms"):
        parse_timeout_header(bad)


@given(
    total=st.floats(0.001, 100),
    requested=st.one_of(st.none(), st.floats(0, 100)),
    steps=st.lists(st.floats(0, 10), max_size=20),
)
def test_remaining_never_exceeds_either_budget(
    total: float, requested: float | None, steps: list[float]
) -> None:
    clock = FakeClock()
    deadline = Deadline.for_call(total, requested, clock)
    limit = total if requested is None else min(total, requested)
    spent = 0.0
    for step in steps:
        clock.advance(step)
        spent += step
        assert 0.0 <= deadline.remaining() <= max(0.0, limit - spent) + 1e-9
