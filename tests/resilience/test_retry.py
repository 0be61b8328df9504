import random

import pytest

from proxy.resilience.backoff import BackoffOptions
from proxy.resilience.outcome import Kind, Outcome
from proxy.resilience.retry import (
    RetryOptions,
    decide,
    parse_retry_after,
    retry_reason,
)
from proxy.resilience.rules import may_send_twice

NO_JITTER = RetryOptions(backoff=BackoffOptions(0.1, 2, 2.0, "none"))


def status(code: int, retry_after: float | None = None) -> Outcome:
    return Outcome(Kind.RESPONSE, code, retry_after=retry_after)


@pytest.mark.parametrize(
    ("outcome", "reason"),
    [
        (Outcome(Kind.CONNECT_FAILURE), "connect_failure"),
        (Outcome(Kind.TIMEOUT), "timeout"),
        (Outcome(Kind.RESET), "reset"),
        (status(502), "status_502"),
        (status(503), "status_503"),
        (status(504), "status_504"),
        (status(500), None),
        (status(429), None),
        (status(404), None),
        (status(200), None),
        (Outcome(Kind.CIRCUIT_OPEN), None),
    ],
)
def test_default_retry_conditions(outcome: Outcome, reason: str | None) -> None:
    assert retry_reason(outcome, RetryOptions()) == reason


def test_conditions_can_be_narrowed() -> None:
    options = RetryOptions(conditions=frozenset({"connect-failure"}), statuses=frozenset({429}))
    assert retry_reason(Outcome(Kind.TIMEOUT), options) is None
    assert retry_reason(status(503), options) is None
    assert retry_reason(status(429), options) == "status_429"


def test_retries_until_attempts_are_used() -> None:
    outcome = status(503)
    assert decide(outcome, 1, 10, NO_JITTER, True).retry
    assert decide(outcome, 2, 10, NO_JITTER, True).retry
    last = decide(outcome, 3, 10, NO_JITTER, True)
    assert not last.retry
    assert last.refused_by == "attempts"


def test_delay_follows_the_backoff_schedule() -> None:
    outcome = Outcome(Kind.RESET)
    assert decide(outcome, 1, 10, NO_JITTER, True).delay == pytest.approx(0.1)
    assert decide(outcome, 2, 10, NO_JITTER, True).delay == pytest.approx(0.2)


def test_no_retry_when_the_deadline_cannot_cover_the_backoff() -> None:
    decision = decide(Outcome(Kind.RESET), 1, 0.05, NO_JITTER, True)
    assert not decision.retry
    assert decision.refused_by == "deadline"


def test_retry_after_lengthens_the_wait_when_it_fits() -> None:
    decision = decide(status(503, retry_after=1.0), 1, 5.0, NO_JITTER, True)
    assert decision.retry
    assert decision.delay == pytest.approx(1.0)


def test_retry_after_beyond_the_deadline_stops_retrying() -> None:
    decision = decide(status(503, retry_after=30.0), 1, 5.0, NO_JITTER, True)
    assert not decision.retry
    assert decision.refused_by == "deadline"


def test_429_is_retried_after_retry_after_when_listed() -> None:
    options = RetryOptions(statuses=frozenset({429}), backoff=NO_JITTER.backoff)
    decision = decide(status(429, retry_after=2.0), 1, 5.0, options, True)
    assert decision.retry
    assert decision.delay == pytest.approx(2.0)


def test_a_request_that_cannot_be_resent_is_not_retried() -> None:
    decision = decide(Outcome(Kind.RESET), 1, 10, NO_JITTER, False)
    assert not decision.retry
    assert decision.refused_by == "request"


@pytest.mark.parametrize(
    ("method", "key", "replayable", "expected"),
    [
        ("GET", False, True, True),
        ("PUT", False, True, True),
        ("DELETE", False, True, True),
        ("POST", False, True, False),
        ("PATCH", False, True, False),
        ("POST", True, True, True),
        ("PATCH", True, True, True),
        ("GET", False, False, False),
        ("POST", True, False, False),
    ],
)
def test_which_requests_may_be_sent_twice(
    method: str, key: bool, replayable: bool, expected: bool
) -> None:
    assert may_send_twice(method, key, replayable) is expected


def test_retry_after_in_seconds_and_as_a_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_jittered_delay_is_reproducible_with_a_seeded_rng() -> None:
    options = RetryOptions()
    one = decide(Outcome(Kind.RESET), 1, 10, options, True, random.Random(1)).delay
    two = decide(Outcome(Kind.RESET), 1, 10, options, True, random.Random(1)).delay
    assert one == two
