"""The shared HTTP rules: one definition each, read by every caller of an upstream."""

from __future__ import annotations

import pytest

from proxy.resilience.breaker import is_failure
from proxy.resilience.outcome import Kind, Outcome
from proxy.resilience.rules import (
    DEFAULT_FALLBACK_ON,
    DEFAULT_RETRY_CONDITIONS,
    FALLBACK_REASONS,
    RETRY_CONDITIONS,
    is_refusal,
    may_have_acted,
    may_send_twice,
    never_sent,
)


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"])
def test_idempotent_methods_may_be_sent_twice_without_a_key(method: str) -> None:
    assert may_send_twice(method, has_idempotency_key=False, body_replayable=True)


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_post_and_patch_need_a_key(method: str) -> None:
    assert not may_send_twice(method, has_idempotency_key=False, body_replayable=True)
    assert may_send_twice(method, has_idempotency_key=True, body_replayable=True)


def test_a_streamed_body_is_never_sent_twice() -> None:
    assert not may_send_twice("PUT", has_idempotency_key=True, body_replayable=False)


@pytest.mark.parametrize("status", [400, 402, 404, 409, 422])
def test_a_4xx_is_a_refusal(status: int) -> None:
    assert is_refusal(status, None)


@pytest.mark.parametrize("status", [None, 200, 408, 425, 429, 500, 503])
def test_no_answer_a_success_a_come_back_later_or_a_5xx_is_not_a_refusal(
    status: int | None,
) -> None:
    assert not is_refusal(status, None)


def test_a_409_with_retry_after_is_a_key_in_progress_not_a_refusal() -> None:
    assert not is_refusal(409, 1.0)


@pytest.mark.parametrize(
    ("outcome", "acted"),
    [
        (Outcome(Kind.TIMEOUT), True),
        (Outcome(Kind.RESET), True),
        (Outcome(Kind.RESPONSE, 500), True),
        (Outcome(Kind.RESPONSE, 502), True),
        (Outcome(Kind.RESPONSE, 504), True),
        (Outcome(Kind.RESPONSE, 503), False),  # sheds load before acting
        (Outcome(Kind.RESPONSE, 200), False),  # an answer: we know what happened
        (Outcome(Kind.CONNECT_FAILURE), False),
        (Outcome(Kind.CIRCUIT_OPEN), False),
        (Outcome(Kind.BULKHEAD_FULL), False),
    ],
)
def test_what_may_have_acted_without_our_learning_it(outcome: Outcome, acted: bool) -> None:
    assert may_have_acted(outcome) is acted


def test_refused_by_the_sidecar_or_unconnected_was_never_sent() -> None:
    assert never_sent(Outcome(Kind.CIRCUIT_OPEN))
    assert never_sent(Outcome(Kind.BULKHEAD_FULL))
    assert never_sent(Outcome(Kind.CONNECT_FAILURE))
    assert not never_sent(Outcome(Kind.TIMEOUT))


@pytest.mark.parametrize("kind", [Kind.TLS_VERIFY_FAILED, Kind.TLS_HANDSHAKE_FAILED])
def test_a_failed_tls_handshake_never_sent_the_request_and_counts_against_the_upstream(
    kind: Kind,
) -> None:
    outcome = Outcome(kind)

    assert never_sent(outcome) and not may_have_acted(outcome)
    assert is_failure(outcome)
    assert outcome.reason == kind.value


def test_tls_failures_are_retry_conditions_but_not_retried_by_default() -> None:
    assert {"tls-verify-failed", "tls-handshake-failed"} <= set(RETRY_CONDITIONS)
    assert not {"tls-verify-failed", "tls-handshake-failed"} & set(DEFAULT_RETRY_CONDITIONS)


def test_fallback_reasons_are_failure_reasons_and_default_leaves_reset_out() -> None:
    failures = {Outcome(kind).reason for kind in Kind if kind is not Kind.RESPONSE}
    assert failures | {"upstream_5xx", "retries_exhausted"} == set(FALLBACK_REASONS)
    assert set(DEFAULT_FALLBACK_ON) == set(FALLBACK_REASONS) - {"reset"}
