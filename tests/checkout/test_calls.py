"""How a checkout call's outcome is read by the saga."""

import pytest

from proxy.checkout.calls import CallOutcome


def outcome(status: int | None, *, retry_after: float | None = None, acted: bool = False):
    reason = "ok" if status and status < 400 else "refused" if status else "timeout"
    return CallOutcome(status, None, 1, 1.0, reason, retry_after, maybe_acted=acted)


@pytest.mark.parametrize("status", [400, 402, 404, 409, 422])
def test_a_4xx_is_the_upstream_saying_no(status: int) -> None:
    assert outcome(status).refused


@pytest.mark.parametrize("status", [408, 425, 429])
def test_ask_again_later_is_not_a_refusal(status: int) -> None:
    assert not outcome(status).refused


def test_a_409_with_retry_after_is_a_key_still_in_progress_not_a_refusal() -> None:
    assert not outcome(409, retry_after=1.0).refused


def test_ambiguous_needs_an_attempt_that_may_have_acted() -> None:
    assert outcome(None, acted=True).ambiguous
    assert not outcome(None, acted=False).ambiguous
    assert not outcome(200, acted=True).ambiguous
    assert not outcome(402, acted=True).ambiguous
