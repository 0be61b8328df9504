"""How a checkout call's outcome is read by the saga."""

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from proxy.checkout.calls import CallOutcome, Verdict, call_json, resolution
from proxy.checkout.plan import RenderedCall
from proxy.resilience.deadline import Deadline
from proxy.upstreams import Upstream
from tests.conftest import make_config


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


# -- the contract of a resolve read's answer --------------------------------------------------


def read(status: int | None, body: Any = None, reason: str = "ok") -> CallOutcome:
    return CallOutcome(status, body, attempts=1, latency_ms=1.0, reason=reason)


@pytest.mark.parametrize(
    ("outcome", "verdict", "found"),
    [
        (read(200, {"id": "auth_1"}), Verdict.ACTED, {"id": "auth_1"}),
        (read(201, [{"id": "auth_1"}]), Verdict.ACTED, {"id": "auth_1"}),
        (read(404, {"error": "not_found"}, "refused"), Verdict.NOT_ACTED, None),
        (read(410, None, "refused"), Verdict.NOT_ACTED, None),
        (read(200, []), Verdict.NOT_ACTED, None),
        (read(200, [{"id": "a"}, {"id": "b"}]), Verdict.UNKNOWN, None),
        (read(200, None), Verdict.UNKNOWN, None),
        (read(200, "yes"), Verdict.UNKNOWN, None),
        (read(409, {"error": "several_under_key"}, "refused"), Verdict.UNKNOWN, None),
        (read(400, None, "refused"), Verdict.UNKNOWN, None),
        (read(500, None, "upstream_5xx"), Verdict.UNKNOWN, None),
        (read(None, None, "timeout"), Verdict.UNKNOWN, None),
        (read(None, None, "circuit_open"), Verdict.UNKNOWN, None),
    ],
    ids=[
        "object",
        "one-item-list",
        "404",
        "410",
        "empty-list",
        "several",
        "no-body",
        "not-json-object",
        "409",
        "400",
        "500",
        "timeout",
        "breaker-open",
    ],
)
def test_resolve_answer_means(outcome: CallOutcome, verdict: Verdict, found: Any) -> None:
    resolved = resolution(outcome)

    assert resolved.verdict == verdict
    assert resolved.body == found


@pytest.fixture
async def echo(start_server: Any) -> AsyncIterator[Upstream]:
    """An upstream that answers with the Idempotency-Key it was sent (or null)."""

    async def headers(request: web.Request) -> web.Response:
        return web.json_response({"key": request.headers.get("Idempotency-Key")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", headers)
    server = await start_server(app)
    config = make_config({"upstreams": {"svc": {"url": str(server.make_url("")).rstrip("/")}}})
    upstream = Upstream("svc", config.upstreams["svc"])
    yield upstream
    await upstream.close()


async def test_a_resolve_read_is_sent_without_an_idempotency_key(echo: Upstream) -> None:
    call = RenderedCall("svc", "GET", "/authorizations?idempotency_key=k%3Apayment", None, {})

    read_back = await call_json(echo, call, None, Deadline.after(2.0))
    keyed = await call_json(echo, call, "k:payment", Deadline.after(2.0))

    assert read_back.body == {"key": None}
    assert keyed.body == {"key": "k:payment"}
