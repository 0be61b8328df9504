"""The sidecar's API document (`proxy/api/openapi.yaml`) against a running sidecar.

The document must be valid OpenAPI 3.1, served at `/admin/openapi.json` behind the
admin token, and true: schemathesis generates requests for every operation from it
and sends them to the shipped config (`config/sidecar.yaml`) in front of the
simulator, on loopback. Every answer must be documented (status, media type, body,
headers), no answer may be a 500, and an answer the sidecar gave itself
(`X-Sidecar-Error`) must be a `SidecarError` with the status the README's table
gives its reason, whatever the route.

The servers run in a thread with their own event loop, because schemathesis calls
them synchronously (requests); the number of examples is bounded so the whole
module takes well under a minute.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import OpenAPIV31SpecValidator
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from proxy.api import openapi_document
from proxy.app import Sidecar
from proxy.checkout.flow import checkout_id_for
from proxy.simulator import Simulator, start_simulator
from tests.checkout.conftest import sidecar_config, simulator_config
from tests.conftest import make_config

TOKEN = "openapi-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UPSTREAMS = ("payment", "inventory", "shipping", "coupon", "fraud", "orders")
# paths the simulated upstreams serve, so proxied requests also reach real handlers
REAL_TAILS = ("authorize", "reservations", "quote", "validate", "score", "_stats", "_ledger")
EXAMPLES = 25  # per operation and mode: bounded, so the module stays well under a minute

# The README's table "Errors from the sidecar": the statuses each reason is answered with.
STATUS_OF_REASON = {
    "timeout": {504},
    "connect_failure": {502},
    "reset": {502},
    "tls_verify_failed": {502},
    "tls_handshake_failed": {502},
    "circuit_open": {503},
    "bulkhead_full": {503},
    "rate_limited": {429},
    "store_unavailable": {503},
    "unknown_upstream": {404},
    "method_not_allowed": {405},
    "payload_too_large": {413},
    "body_timeout": {408},
    "bad_request": {400},
    "incomplete_body": {400},
    "idempotency_key_missing": {400},
    "idempotency_key_invalid": {400},
    "idempotency_scope_missing": {400},
    "idempotency_key_in_progress": {409},
    "idempotency_key_reused": {422},
    "unknown_checkout": {404},
    "unauthorized": {401},
    "breaker_disabled": {409},
    "queue_unavailable": {503},
    "unknown_job": {404},
}

METHODS = ("get", "post", "put", "patch", "delete", "head", "options")
DOCUMENT = openapi_document()
SCHEMA = schemathesis.openapi.from_dict(openapi_document())
ADMIN_PATHS = {
    path
    for path, item in DOCUMENT["paths"].items()
    if any("admin" in op.get("tags", []) for op in item.values() if isinstance(op, dict))
}
OPERATIONS = [
    f"{method.upper()} {path}"
    for path, item in DOCUMENT["paths"].items()
    for method in METHODS
    if method in item
]


# -- a sidecar and the simulator, served from a thread -----------------------------------


@dataclass
class Live:
    """The shipped sidecar in front of the simulator, with an admin token."""

    loop: asyncio.AbstractEventLoop
    sim: Simulator
    sidecar: Sidecar
    url: str
    admin_url: str
    stop: asyncio.Event
    admin_app: web.Application | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    def set_faults(self, faults: dict[str, Any]) -> None:
        """The same faults on every simulated upstream, set on the servers' loop."""

        async def apply() -> None:
            for name in ("payment", "inventory", "shipping", "coupon", "fraud"):
                self.sim.set_faults(name, faults)

        asyncio.run_coroutine_threadsafe(apply(), self.loop).result(timeout=5)


async def _serve(tmp: Path, ready: Future[Live]) -> None:
    async with await start_simulator(simulator_config()) as sim:
        data = sidecar_config(sim, f"sqlite://{tmp}/openapi-{uuid.uuid4().hex[:8]}.db")
        data["admin"] = {"listen": "127.0.0.1:0", "token": TOKEN}
        sidecar = Sidecar(make_config(data))
        await sidecar.start()
        admin = web.AppRunner(sidecar.build_admin_app())
        runners: list[web.BaseRunner] = [web.ServerRunner(sidecar.build_server()), admin]
        urls = []
        try:
            for runner in runners:
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                host, port = runner.addresses[0][:2]
                urls.append(f"http://{host}:{port}")
            sidecar.ready = True  # as `serve` does once both listeners are up
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            ready.set_result(Live(loop, sim, sidecar, urls[0], urls[1], stop, admin.app))
            await stop.wait()
        finally:
            for runner in reversed(runners):
                await runner.cleanup()
            await sidecar.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    ready: Future[Live] = Future()
    tmp = tmp_path_factory.mktemp("openapi")

    def run() -> None:
        try:
            asyncio.run(_serve(tmp, ready))
        except BaseException as exc:  # a failed start must fail the test, not hang it
            if not ready.done():
                ready.set_exception(exc)
            raise

    thread = threading.Thread(target=run, name="openapi-live", daemon=True)
    thread.start()
    server = ready.result(timeout=30)
    server.thread = thread
    yield server
    server.loop.call_soon_threadsafe(server.stop.set)
    thread.join(timeout=30)
    assert not thread.is_alive(), "the sidecar did not stop"


# -- the document ------------------------------------------------------------------------


def test_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1.")
    errors = [str(e.message) for e in OpenAPIV31SpecValidator(DOCUMENT).iter_errors()]
    assert errors == []


def test_every_route_of_both_apps_is_described(live: Live) -> None:
    """A route added to the sidecar without a line in the document fails here."""
    described = {
        (method.upper(), path)
        for path, item in DOCUMENT["paths"].items()
        for method in item
        if method in METHODS
    }
    assert live.admin_app is not None
    served = [
        (route.method, route.resource.canonical if route.resource is not None else "")
        for route in live.admin_app.router.routes()
    ]
    served += live.sidecar.data_plane().routes()  # routed by DataPlane, no router
    for served_method, path in served:
        if served_method == "HEAD" and ("GET", path) in described:
            continue  # aiohttp's, beside every GET
        methods = [m.upper() for m in METHODS] if served_method == "*" else [served_method]
        for method in methods:
            assert (method, path) in described, f"{method} {path} is not in openapi.yaml"


def test_admin_serves_the_document_behind_the_token(live: Live) -> None:
    url = f"{live.admin_url}/admin/openapi.json"
    served = requests.get(url, headers=AUTH, timeout=5)
    assert served.status_code == 200
    assert served.headers["Content-Type"].startswith("application/json")
    assert served.json() == DOCUMENT

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        refused = requests.get(url, headers=headers, timeout=5)
        assert refused.status_code == 401, headers
        assert refused.json()["reason"] == "unauthorized"
        assert "Bearer" in refused.headers["WWW-Authenticate"]
    # the probes stay open
    assert requests.get(f"{live.admin_url}/healthz", timeout=5).status_code == 200


# -- schemathesis ------------------------------------------------------------------------


def _refused_by_the_http_parser(response: Any) -> bool:
    """aiohttp's own 400 for a request its parser cannot read (a negative case's
    `Transfer-Encoding: null`, say): plain text, before any handler of ours ran. It is
    counted in sidecar_bad_requests_total; a route's answers always carry our headers."""
    content_type = (response.headers.get("content-type") or [""])[0]
    return (
        response.status_code == 400
        and content_type.startswith("text/plain")
        and not response.headers.get("x-sidecar-attempts")
        and not response.headers.get("x-sidecar-error")
    )


def proxied_answer_conformance(ctx: Any, response: Any, case: Any) -> bool | None:
    """README, Endpoints: a proxied route has `X-Sidecar-Attempts` on every answer; and
    Errors: the sidecar's own error there names the `upstream` and the `attempts`."""
    if "proxy" not in case.operation.definition.raw.get("tags", []):
        return None
    if _refused_by_the_http_parser(response):
        return None  # never reached a route: no upstream, no attempts to count
    attempts = response.headers.get("x-sidecar-attempts")
    assert attempts is not None, f"{response.status_code} without X-Sidecar-Attempts"
    if response.headers.get("x-sidecar-error") and case.method.upper() != "HEAD":
        body = json.loads(response.content)
        missing = {"upstream", "attempts"} - set(body)
        assert not missing, f"the sidecar's {body['reason']} lacks {sorted(missing)}"
    return True


def sidecar_error_conformance(ctx: Any, response: Any, case: Any) -> bool | None:
    """An answer the sidecar gave itself is a SidecarError with its reason's status.

    On a proxied route the document allows any body (the upstream's); this is what
    tells the sidecar's own answers apart and holds them to the error schema.
    """
    reasons = response.headers.get("x-sidecar-error")
    if not reasons:
        return None
    reason = reasons[0]
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.startswith("application/json"), (
        f"X-Sidecar-Error: {reason} with Content-Type {content_type!r}"
    )
    if case.method.upper() == "HEAD":
        return True  # a HEAD answer has no body to check
    body = json.loads(response.content)
    jsonschema.validate(
        body,
        {"$ref": "#/components/schemas/SidecarError", "components": DOCUMENT["components"]},
    )
    assert body["reason"] == reason, f"X-Sidecar-Error {reason!r} but reason {body['reason']!r}"
    assert response.status_code in STATUS_OF_REASON[reason], (
        f"{reason} answered with {response.status_code}, the README says "
        f"{sorted(STATUS_OF_REASON[reason])}"
    )
    attempts = response.headers.get("x-sidecar-attempts")
    if "attempts" in body:
        assert attempts == [str(body["attempts"])], "X-Sidecar-Attempts and attempts differ"
    return True


def no_internal_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 500 from the sidecar itself; an upstream's 500 passed through carries
    X-Sidecar-Attempts (the simulator answers 503 for the faults injected here).
    Other 5xx are documented answers (504 timeout, 503 unavailable, ...)."""
    if response.status_code == 500:
        assert "x-sidecar-attempts" in response.headers, (
            f"500 from the sidecar: {response.content[:300]!r}"
        )
    return True


def _checkout_id(response: Any) -> str | None:
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    return body.get("checkout_id") if isinstance(body, dict) else None


def _of_a_route(check: Any) -> Any:
    """`check` for answers a route gave. A request the HTTP parser refused (a negative
    case's `Content-Length: )z>`, say) never reached one: its plain-text 400 can come
    on any path, as a reset can, and the document describes what routes answer."""

    def checked(ctx: Any, response: Any, case: Any) -> bool | None:
        if _refused_by_the_http_parser(response):
            return None
        result: bool | None = check(ctx, response, case)
        return result

    checked.__name__ = check.__name__
    return checked


CHECKS = [
    no_internal_error,
    _of_a_route(status_code_conformance),
    _of_a_route(content_type_conformance),
    _of_a_route(response_headers_conformance),
    _of_a_route(response_schema_conformance),
    sidecar_error_conformance,
    proxied_answer_conformance,
]

FAULTS = {
    "healthy": {},
    # every upstream fails now and then: retries, fallbacks, rejections, 502/503 errors
    "faulty": {"error_rate": 0.3, "error_status": 503, "retry_after": 1, "reset_rate": 0.1},
}


@pytest.mark.parametrize("faults", sorted(FAULTS))
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("label", OPERATIONS)
def test_answers_match_the_document(
    live: Live, label: str, mode: GenerationMode, faults: str
) -> None:
    method, path = label.split(" ", 1)
    if faults != "healthy" and path in ADMIN_PATHS:
        pytest.skip("the admin API does not call upstreams: one run is enough")
    operation = SCHEMA[path][method]
    admin = path in ADMIN_PATHS
    base_url = live.admin_url if admin else live.url
    headers = AUTH if admin else None
    overrides: dict[str, Any] = {}
    if "upstream" in path and not admin:
        # mostly configured upstreams, so requests reach them (and the simulator)
        upstream = st.sampled_from([*UPSTREAMS, "no-such-upstream"])
        tail = st.one_of(st.sampled_from(REAL_TAILS), st.none())  # None: the generated one
        overrides["path_parameters"] = st.fixed_dictionaries({"upstream": upstream, "tail": tail})
    live.set_faults(FAULTS[faults])
    strategy = operation.as_strategy(generation_mode=mode)
    session = requests.Session()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy, data=st.data())
    def run(case: Any, data: st.DataObject) -> None:
        for name, value in overrides.items():
            drawn = data.draw(value)
            getattr(case, name).update({k: v for k, v in drawn.items() if v is not None})
        response = case.call_and_validate(
            base_url=base_url, session=session, headers=headers, checks=CHECKS, timeout=10
        )
        if label == "POST /checkout":
            # the same key again: a replay (or 409 while the first runs), documented too
            case.call_and_validate(
                base_url=base_url, session=session, headers=headers, checks=CHECKS, timeout=10
            )
            # and the checkout's state, when one was journalled
            checkout_id = _checkout_id(response)
            if checkout_id is not None:
                poll = SCHEMA["/checkout/{id}"]["GET"].Case(path_parameters={"id": checkout_id})
                poll.call_and_validate(base_url=base_url, session=session, checks=CHECKS)

    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.NEGATIVE:  # e.g. GET /checkout/{id}: any id string is valid
            pytest.skip(f"no request can break the schema of {label}")
        raise
    finally:
        session.close()
        live.set_faults({})
        # the breakers as they were, whatever POST /admin/breakers/{upstream} did to them
        for name in UPSTREAMS:
            reset = {"action": "reset"}
            url = f"{live.admin_url}/admin/breakers/{name}"
            requests.post(url, json=reset, headers=AUTH, timeout=5)


def test_a_checkout_resumed_after_a_crash_answers_as_documented(live: Live) -> None:
    """A key whose checkout was journalled but never answered (its first request
    crashed, its idempotency claim lapsed): the repeat has recovery reject it at once
    and gets 202 pending while the compensations of whatever may have acted run,
    shaped like every other checkout answer (`degraded` and `steps` included)."""
    key = f"resumed-{uuid.uuid4().hex[:12]}"
    body = {
        "items": [{"sku": "sku-1", "qty": 1}],
        "amount": 1000,
        "currency": "EUR",
        "customer": "cust-trusted",
        "card": "4242",
        "address": {"country": "DE", "zip": "10115"},
    }

    async def journalled_then_crashed() -> None:
        flow = live.sidecar.runtime.flow
        assert flow is not None
        record = flow.new_record(checkout_id_for(key), key, key, body, {})
        assert await flow.journal.create(record)

    asyncio.run_coroutine_threadsafe(journalled_then_crashed(), live.loop).result(timeout=5)
    case = SCHEMA["/checkout"]["POST"].Case(
        headers={"Idempotency-Key": key}, body=body, media_type="application/json"
    )
    response = case.call_and_validate(base_url=live.url, checks=CHECKS, timeout=10)
    assert response.status_code == 202, response.content
    answer = response.json()
    assert answer["checkout_id"] == checkout_id_for(key)
    assert (answer["status"], answer["decision"]) == ("pending", "rejected")
    assert answer["poll"] == f"/checkout/{answer['checkout_id']}"


def test_a_checkout_body_over_the_limit_is_a_json_error(live: Live) -> None:
    """aiohttp's own 413 is text/plain; the sidecar answers with its JSON error."""
    body = {"items": [], "padding": "x" * (10 * 1024 * 1024)}
    case = SCHEMA["/checkout"]["POST"].Case(
        headers={"Idempotency-Key": f"big-{uuid.uuid4().hex[:12]}"},
        body=body,
        media_type="application/json",
    )
    response = case.call_and_validate(base_url=live.url, checks=CHECKS, timeout=30)
    assert response.status_code == 413
    assert response.json()["reason"] == "payload_too_large"


def test_found_by_schemathesis_stay_fixed(live: Live) -> None:
    """Answers schemathesis once found wrong, each pinned as a plain example."""
    # `{"action": []}`: an unhashable action was a 500 from the admin app
    control = SCHEMA["/admin/breakers/{upstream}"]["POST"].Case(
        path_parameters={"upstream": "payment"}, body={"action": []}, media_type="application/json"
    )
    response = control.call_and_validate(
        base_url=live.admin_url, headers=AUTH, checks=CHECKS, timeout=10
    )
    assert response.status_code == 400
    # an encoded newline in the tail did not match the route: aiohttp's text 404
    proxied = SCHEMA["/{upstream}/{tail}"]["GET"].Case(
        path_parameters={"upstream": "payment", "tail": "a\nb"}
    )
    response = proxied.call_and_validate(base_url=live.url, checks=CHECKS, timeout=10)
    assert "x-sidecar-attempts" in response.headers  # lower-case names, lists of values
    # a proxied error made before any call names its upstream and 0 attempts
    unknown = SCHEMA["/{upstream}/{tail}"]["GET"].Case(
        path_parameters={"upstream": "no-such-upstream", "tail": "x"}
    )
    response = unknown.call_and_validate(base_url=live.url, checks=CHECKS, timeout=10)
    assert response.status_code == 404
    assert response.headers["x-sidecar-attempts"] == ["0"]
    assert response.json()["attempts"] == 0
