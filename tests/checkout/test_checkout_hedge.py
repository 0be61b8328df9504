"""A checkout step's `hedge: true`: its call may race a copy, when its upstream allows it."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from proxy.checkout.calls import call_json
from proxy.checkout.plan import CheckoutPlan, RenderedCall
from proxy.upstreams import Upstream
from tests.conftest import StartServer, make_config

SLOW = 0.3


def slow_first_answer() -> tuple[web.Application, list[str | None]]:
    """An upstream whose first request takes `SLOW`; the keys of what it saw."""
    keys: list[str | None] = []

    async def handle(request: web.Request) -> web.Response:
        keys.append(request.headers.get("Idempotency-Key"))
        if len(keys) == 1:
            await asyncio.sleep(SLOW)
        return web.json_response({"id": "q1", "n": len(keys)})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app, keys


def upstream_config(url: str, *, idempotency: bool) -> dict[str, Any]:
    return {
        "url": url,
        "idempotency": idempotency,
        "hedge": {"after": "20ms"},
        "breaker": {"enabled": False},
    }


async def _quote(start_server: StartServer, *, idempotency: bool, hedge: bool) -> list[str | None]:
    app, keys = slow_first_answer()
    server = await start_server(app)
    config = make_config(
        {
            "upstreams": {
                "shipping": upstream_config(
                    str(server.make_url("")).rstrip("/"), idempotency=idempotency
                )
            }
        }
    )
    upstream = Upstream("shipping", config.upstreams["shipping"])
    try:
        call = RenderedCall("shipping", "POST", "/quote", {"items": 1}, {})
        outcome = await call_json(
            upstream, call, "chk_1:shipping", upstream.deadline(), hedge=hedge
        )
    finally:
        await upstream.close()
    assert outcome.ok
    return keys


async def test_a_hedged_step_to_an_idempotency_upstream_races_a_copy_with_the_same_key(
    start_server: StartServer,
) -> None:
    keys = await _quote(start_server, idempotency=True, hedge=True)
    assert keys == ["chk_1:shipping", "chk_1:shipping"]


async def test_a_step_without_hedge_true_is_sent_once(start_server: StartServer) -> None:
    keys = await _quote(start_server, idempotency=True, hedge=False)
    assert keys == ["chk_1:shipping"]


async def test_a_hedged_post_step_to_an_upstream_that_keeps_no_keys_is_sent_once(
    start_server: StartServer,
) -> None:
    keys = await _quote(start_server, idempotency=False, hedge=True)
    assert keys == ["chk_1:shipping"]


def test_the_steps_hedge_flag_reaches_the_plan_and_defaults_to_false() -> None:
    config = make_config(
        {
            "upstreams": {
                "shipping": {"url": "http://127.0.0.1:9", "hedge": {"after": "p95"}},
                "payment": {"url": "http://127.0.0.1:9"},
            },
            "composite": {
                "checkout": {
                    "steps": {
                        "shipping": {
                            "upstream": "shipping",
                            "critical": False,
                            "hedge": True,
                            "request": {"method": "GET", "path": "/quote"},
                        },
                        "payment": {
                            "upstream": "payment",
                            "request": {"method": "POST", "path": "/authorize"},
                        },
                    }
                }
            },
        }
    )
    checkout = config.composite.checkout
    assert checkout is not None
    plan = CheckoutPlan.of(checkout)
    assert plan.steps["shipping"].hedge is True
    assert plan.steps["payment"].hedge is False
