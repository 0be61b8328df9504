"""The HTTP rules every caller of an upstream shares, each defined once.

The proxied route, the checkout's calls, its queued commits and compensations and
the generic `upstream_call` job all ask the same questions of an upstream call: may
this request be sent twice, is this outcome worth another attempt, did the upstream
say no, might it have acted although we never heard back, which failures may a
fallback answer. When each caller kept its own copy the answers drifted apart (one
job retried only GET/PUT/DELETE, another forgot that a 409 with Retry-After means
"still in progress"), so they live here, pure, with the RFC that each follows.
"""

from __future__ import annotations

from typing import Literal, get_args

from proxy.resilience.outcome import RESPONSE, Kind, Outcome

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
"""RFC 9110 9.2.2: sending one of these twice has the effect of sending it once."""

HEDGE_METHODS = frozenset({"GET", "HEAD"})
"""Methods hedged without a key: they only read, so a second copy in flight at the
same time as the first changes nothing. PUT and DELETE are idempotent in effect,
but two of them racing may still interleave with another writer's request."""

KEY_REQUIRED_METHODS = frozenset({"POST", "PATCH"})
"""Not idempotent: only an Idempotency-Key makes a second send safe."""

RetryConditionName = Literal[
    "connect-failure", "timeout", "reset", "tls-verify-failed", "tls-handshake-failed"
]
RETRY_CONDITIONS: tuple[RetryConditionName, ...] = get_args(RetryConditionName)
"""The failures without a status that `retry.on` may name, as config spells them."""

DEFAULT_RETRY_CONDITIONS: tuple[RetryConditionName, ...] = ("connect-failure", "timeout", "reset")
"""What `retry.on` holds unless configured: the TLS failures are left out because a
second handshake meets the same certificate (an untrusted or expired one, a missing
client certificate) and fails the same way; it only spends the deadline and the
retry budget. An upstream whose TLS failures are transient may name them."""

CONDITION_OF_KIND = {
    Kind.CONNECT_FAILURE: "connect-failure",
    Kind.TIMEOUT: "timeout",
    Kind.RESET: "reset",
    Kind.TLS_VERIFY_FAILED: "tls-verify-failed",
    Kind.TLS_HANDSHAKE_FAILED: "tls-handshake-failed",
}

RETRY_AFTER_STATUSES = frozenset({409, 429, 503})
"""Statuses whose Retry-After is honoured: 429 and 503 (RFC 9110 10.2.3), and 409,
the answer of an upstream whose key is still in progress (IETF idempotency draft)."""

NOT_A_REFUSAL = frozenset({408, 425, 429})
"""4xx answers that mean "ask again later", not "no": Request Timeout, Too Early,
Too Many Requests (RFC 9110 15.5.9, RFC 8470 5.2, RFC 6585 4)."""

NEVER_SENT = frozenset(
    {
        Kind.CIRCUIT_OPEN,
        Kind.BULKHEAD_FULL,
        Kind.RATE_LIMITED,
        Kind.STORE_UNAVAILABLE,
        Kind.CONNECT_FAILURE,
        Kind.TLS_VERIFY_FAILED,
        Kind.TLS_HANDSHAKE_FAILED,
    }
)
"""Outcomes of a call whose request never reached the upstream: a refusal by the
sidecar (breaker, bulkhead, rate limit, or its shared store down), a failed connect,
or a failed TLS handshake, which ends before any HTTP byte is sent. A keyed request
refused so gets its Idempotency-Key back (the guard's `NotRun`)."""

SLOW_DOWN_STATUS = 429
"""RFC 6585 4: Too Many Requests. With Retry-After it pauses the upstream's rate limit."""

FallbackReason = Literal[
    "timeout",
    "circuit_open",
    "bulkhead_full",
    "rate_limited",
    "store_unavailable",
    "retries_exhausted",
    "upstream_5xx",
    "connect_failure",
    "reset",
    "tls_verify_failed",
    "tls_handshake_failed",
]
FALLBACK_REASONS: tuple[FallbackReason, ...] = get_args(FallbackReason)
"""Every failure a fallback can answer: the values of `Outcome.reason` that are
failures, plus `retries_exhausted` for a call whose retries ran out."""

DEFAULT_FALLBACK_ON: tuple[FallbackReason, ...] = tuple(
    reason for reason in FALLBACK_REASONS if reason != "reset"
)
"""What a fallback answers unless configured otherwise: a reset mid-body is left out
because part of the real answer may already have reached the caller. The TLS
failures are in: the fallback's answer comes from the sidecar (a static response,
or a GET answered earlier by the verified upstream), never from the peer that
failed the handshake."""


def may_send_twice(method: str, has_idempotency_key: bool, body_replayable: bool) -> bool:
    """Whether a request may be retried (or hedged): the upstream acts at most once.

    POST and PATCH may have acted before their answer was lost; only an
    Idempotency-Key makes a second send safe. A body that was streamed cannot be
    sent again at all.
    """
    if not body_replayable:
        return False
    return method in IDEMPOTENT_METHODS or has_idempotency_key


def may_hedge(
    method: str, has_idempotency_key: bool, body_replayable: bool, upstream_idempotent: bool
) -> bool:
    """Whether a request may be hedged: two copies in flight at once, the upstream acting once.

    Stricter than `may_send_twice`, where the second send follows the first's
    failure: a hedge races a first copy that may still be acting. So only reads
    (`HEDGE_METHODS`), and keyed requests to an upstream that keeps its keys
    (`idempotency: true`), which answers the second copy with the first's result.
    """
    if not body_replayable:
        return False
    return method in HEDGE_METHODS or (has_idempotency_key and upstream_idempotent)


def is_refusal(status: int | None, retry_after: float | None) -> bool:
    """Whether an answer is the upstream saying no (card declined, out of stock).

    Any 4xx, except those that ask to come back later (`NOT_A_REFUSAL`) and a 409
    with Retry-After, the upstream's "this key is still being processed".
    """
    if status is None or not 400 <= status < 500 or status in NOT_A_REFUSAL:
        return False
    return not (status == 409 and retry_after is not None)


def may_have_acted(outcome: Outcome) -> bool:
    """Whether an attempt may have acted upstream without our learning of it.

    A timeout, a reset, or a 5xx other than 503 may come after the upstream acted;
    a 503 sheds load before acting (RFC 9110 15.6.4), and a refusal by the sidecar
    or a failed connect never reached it.
    """
    if outcome.kind is Kind.TIMEOUT or outcome.kind is Kind.RESET:
        return True
    return outcome.kind is RESPONSE and outcome.status >= 500 and outcome.status != 503


def slow_down_for(outcome: Outcome) -> float | None:
    """Seconds the upstream asked us to stay away: a 429's Retry-After, else None.

    Only 429 means "you are over my quota"; a 503's Retry-After is about the
    upstream's own health, which the breaker already watches.
    """
    if outcome.kind is RESPONSE and outcome.status == SLOW_DOWN_STATUS:
        return outcome.retry_after
    return None


def never_sent(outcome: Outcome) -> bool:
    """Whether the request is known not to have reached the upstream."""
    return outcome.kind in NEVER_SENT


def failed_for_caller(outcome: Outcome) -> bool:
    """Whether the caller got no usable answer: no response at all, or a 5xx."""
    return outcome.kind is not RESPONSE or outcome.status >= 500
