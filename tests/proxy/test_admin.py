"""The admin listener over real sockets: probes, breaker control, and the bearer token."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from proxy.app import Sidecar
from proxy.config.loader import validate_text
from tests.conftest import make_config

TOKEN = "s3cret"


def failing_upstream() -> tuple[web.Application, list[int]]:
    hits = [0]

    async def handle(request: web.Request) -> web.Response:
        hits[0] += 1
        return web.json_response({"from": "upstream"}, status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app, hits


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def stack(start_server):
    """payment and inventory in front of one failing upstream; (sidecar, proxy, admin, hits)."""

    async def make(admin: dict | None = None, min_calls: int = 100):
        app, hits = failing_upstream()
        server = await start_server(app)
        url = str(server.make_url("")).rstrip("/")
        upstream = {"url": url, "retry": {"attempts": 1}, "breaker": {"min_calls": min_calls}}
        data = {"upstreams": {"payment": upstream, "inventory": upstream}}
        if admin is not None:
            data["admin"] = admin
        sidecar = Sidecar(make_config(data))
        proxy = await start_server(sidecar.build_app())
        admin_server = await start_server(sidecar.build_admin_app())
        base = str(proxy.make_url("")).rstrip("/")
        return sidecar, base, str(admin_server.make_url("")).rstrip("/"), hits

    return make


async def _control(client, admin: str, name: str, body: object) -> tuple[int, dict]:
    async with client.post(f"{admin}/admin/breakers/{name}", json=body) as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


# -- probes ---------------------------------------------------------------------------


async def test_healthz_answers_200(stack, client) -> None:
    _, _, admin, _ = await stack()
    async with client.get(f"{admin}/healthz") as response:
        assert response.status == 200
        assert (await response.json())["status"] == "alive"


async def test_readyz_follows_the_sidecars_ready_flag(stack, client) -> None:
    sidecar, _, admin, _ = await stack()

    sidecar.ready, sidecar.not_ready_reason = False, "starting"
    async with client.get(f"{admin}/readyz") as response:
        assert response.status == 503
        assert await response.json() == {"status": "not ready", "reason": "starting"}

    sidecar.ready = True
    async with client.get(f"{admin}/readyz") as response:
        assert response.status == 200

    sidecar.ready, sidecar.not_ready_reason = False, "shutting down"
    async with client.get(f"{admin}/readyz") as response:
        assert response.status == 503
        assert (await response.json())["reason"] == "shutting down"


# -- breakers -------------------------------------------------------------------------


async def test_breakers_lists_every_upstream_with_its_state(stack, client) -> None:
    _, base, admin, _ = await stack()
    async with client.get(f"{base}/payment/charge") as response:
        assert response.status == 500

    async with client.get(f"{admin}/admin/breakers") as response:
        assert response.status == 200
        breakers = await response.json()
    assert set(breakers) == {"payment", "inventory"}
    payment = breakers["payment"]
    assert payment["state"] == "closed"
    assert payment["failure_rate"] == 1.0
    assert payment["calls_in_window"] == 1
    assert payment["open_remaining"] == 0
    assert breakers["inventory"]["calls_in_window"] == 0


async def test_forcing_a_breaker_open_refuses_calls_without_an_upstream_hit(stack, client) -> None:
    _, base, admin, hits = await stack()
    status, body = await _control(client, admin, "payment", {"action": "open"})
    assert status == 200
    assert body["payment"]["state"] == "open"
    assert body["payment"]["forced"] == "open"

    async with client.get(f"{base}/payment/charge") as response:
        assert response.status == 503
        assert (await response.json())["reason"] == "circuit_open"
        assert "Retry-After" in response.headers
    assert hits[0] == 0
    async with client.get(f"{base}/inventory/reserve") as response:
        assert response.status == 500  # the other upstream is untouched
    assert hits[0] == 1


async def test_forcing_a_breaker_closed_lets_calls_through_again(stack, client) -> None:
    _, base, admin, hits = await stack()
    await _control(client, admin, "payment", {"action": "open"})

    status, body = await _control(client, admin, "payment", {"action": "close"})
    assert status == 200
    assert body["payment"]["state"] == "closed"
    assert body["payment"]["forced"] == "closed"
    async with client.get(f"{base}/payment/charge") as response:
        assert response.status == 500
    assert hits[0] == 1


async def test_a_forced_closed_breaker_does_not_open_on_failures(stack, client) -> None:
    _, base, admin, hits = await stack(min_calls=1)
    await _control(client, admin, "payment", {"action": "close"})
    for _ in range(3):
        async with client.get(f"{base}/payment/charge") as response:
            assert response.status == 500
    async with client.get(f"{admin}/admin/breakers") as response:
        assert (await response.json())["payment"]["state"] == "closed"
    assert hits[0] == 3


async def test_reset_clears_the_override_and_the_window(stack, client) -> None:
    _, base, admin, _ = await stack()
    async with client.get(f"{base}/payment/charge") as response:
        assert response.status == 500
    await _control(client, admin, "payment", {"action": "open"})

    status, body = await _control(client, admin, "payment", {"action": "reset"})
    assert status == 200
    assert body["payment"]["state"] == "closed"
    assert body["payment"]["forced"] is None
    assert body["payment"]["calls_in_window"] == 0
    async with client.get(f"{base}/payment/charge") as response:
        assert response.status == 500


@pytest.mark.parametrize("body", [{"action": "explode"}, {}, ["open"], "open"])
async def test_a_bad_action_is_a_json_400(stack, client, body) -> None:
    _, _, admin, _ = await stack()
    status, answer = await _control(client, admin, "payment", body)
    assert status == 400
    assert answer["reason"] == "bad_request"


async def test_a_body_that_is_not_json_is_a_json_400(stack, client) -> None:
    _, _, admin, _ = await stack()
    async with client.post(f"{admin}/admin/breakers/payment", data=b"open") as response:
        assert response.status == 400
        assert (await response.json())["reason"] == "bad_request"


async def test_an_unknown_upstream_is_a_json_404(stack, client) -> None:
    _, _, admin, _ = await stack()
    status, answer = await _control(client, admin, "nosuch", {"action": "open"})
    assert status == 404
    assert answer["reason"] == "unknown_upstream"
    assert answer["upstream"] == "nosuch"


# -- the token ------------------------------------------------------------------------

OFF_LOOPBACK = {"listen": "0.0.0.0:0", "token": TOKEN}  # only built here, never bound


@pytest.mark.parametrize("path", ["/metrics", "/admin/breakers"])
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}", TOKEN])
async def test_admin_endpoints_refuse_a_missing_or_wrong_token_with_json_401(
    stack, client, path, authorization
) -> None:
    _, _, admin, _ = await stack(OFF_LOOPBACK)
    headers = {} if authorization is None else {"Authorization": authorization}
    async with client.get(f"{admin}{path}", headers=headers) as response:
        assert response.status == 401
        assert response.content_type == "application/json"
        assert (await response.json())["reason"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_breaker_control_refuses_a_missing_token(stack, client) -> None:
    _, base, admin, hits = await stack(OFF_LOOPBACK)
    async with client.post(f"{admin}/admin/breakers/payment", json={"action": "open"}) as response:
        assert response.status == 401
    async with client.get(f"{base}/payment/charge") as response:
        assert response.status == 500  # not opened
    assert hits[0] == 1


@pytest.mark.parametrize("path", ["/metrics", "/admin/breakers"])
async def test_admin_endpoints_answer_with_the_right_token(stack, client, path) -> None:
    _, _, admin, _ = await stack(OFF_LOOPBACK)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with client.get(f"{admin}{path}", headers=headers) as response:
        assert response.status == 200


async def test_probes_need_no_token(stack, client) -> None:
    sidecar, _, admin, _ = await stack(OFF_LOOPBACK)
    sidecar.ready = True
    for path in ("/healthz", "/readyz"):
        async with client.get(f"{admin}{path}") as response:
            assert response.status == 200, path


def test_admin_beyond_loopback_without_a_token_is_a_config_error_naming_admin_listen() -> None:
    config, errors = validate_text("admin:\n  listen: 0.0.0.0:9901\n", "sidecar.yaml", env={})
    assert config is None
    assert [(e.line, e.path) for e in errors] == [(2, "admin.listen")]
    assert "admin.token" in str(errors[0])
