"""Proxied upstreams with `idempotency: true`: a keyed POST reaches the upstream once."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web


class Payments:
    def __init__(self) -> None:
        self.hits = 0
        self.status = 201

    def app(self) -> web.Application:
        async def authorize(request: web.Request) -> web.Response:
            self.hits += 1
            await request.read()
            await asyncio.sleep(0)  # let concurrent repeats arrive while this one runs
            return web.json_response({"id": f"auth_{self.hits}"}, status=self.status)

        app = web.Application()
        app.router.add_post("/authorize", authorize)
        return app


async def _stack(start_server, start_sidecar, **extra):
    payments = Payments()
    server = await start_server(payments.app())
    upstream = {"url": str(server.make_url("")).rstrip("/"), "idempotency": True}
    sidecar, base = await start_sidecar({"upstreams": {"payment": upstream}, **extra})
    return payments, sidecar, f"{base}/payment/authorize"


async def test_fifty_concurrent_posts_with_one_key_reach_the_upstream_once(
    start_server, start_sidecar
) -> None:
    payments, _, url = await _stack(start_server, start_sidecar)
    headers = {"Idempotency-Key": "order-7"}
    async with aiohttp.ClientSession() as client:

        async def post() -> tuple[int, bytes, str | None]:
            async with client.post(url, json={"amount": 5}, headers=headers) as response:
                return (
                    response.status,
                    await response.read(),
                    response.headers.get("Idempotent-Replayed"),
                )

        answers = await asyncio.gather(*(post() for _ in range(50)))
    assert payments.hits == 1
    statuses = {status for status, _, _ in answers}
    assert statuses <= {201, 409}
    bodies = {body for status, body, _ in answers if status == 201}
    assert bodies == {b'{"id": "auth_1"}'}


async def test_a_repeat_is_replayed_byte_for_byte(start_server, start_sidecar) -> None:
    payments, _, url = await _stack(start_server, start_sidecar)
    headers = {"Idempotency-Key": "order-8"}
    async with aiohttp.ClientSession() as client:
        async with client.post(url, json={"amount": 5}, headers=headers) as first:
            first_body = await first.read()
            assert first.headers.get("Idempotent-Replayed") is None
        async with client.post(url, json={"amount": 5}, headers=headers) as again:
            assert again.status == 201
            assert await again.read() == first_body
            assert again.headers["Idempotent-Replayed"] == "true"
        async with client.post(url, json={"amount": 6}, headers=headers) as other:
            assert other.status == 422
    assert payments.hits == 1


async def test_a_refusal_before_the_upstream_gives_the_key_back(
    start_server, start_sidecar
) -> None:
    payments, sidecar, url = await _stack(start_server, start_sidecar)
    breaker = sidecar.runtime.upstreams.get("payment").policies.breaker
    breaker.force_open()
    headers = {"Idempotency-Key": "order-9"}
    async with aiohttp.ClientSession() as client:
        async with client.post(url, json={"amount": 5}, headers=headers) as refused:
            assert refused.status == 503
            assert (await refused.json())["reason"] == "circuit_open"
        breaker.reset()
        async with client.post(url, json={"amount": 5}, headers=headers) as later:
            assert later.status == 201
            assert later.headers.get("Idempotent-Replayed") is None
    assert payments.hits == 1


async def test_posts_without_a_key_pass_through_unguarded(start_server, start_sidecar) -> None:
    payments, _, url = await _stack(start_server, start_sidecar)
    async with aiohttp.ClientSession() as client:
        for _ in range(2):
            async with client.post(url, json={"amount": 5}) as response:
                assert response.status == 201
    assert payments.hits == 2


async def test_required_for_refuses_a_post_without_a_key(start_server, start_sidecar) -> None:
    payments, _, url = await _stack(
        start_server, start_sidecar, idempotency={"required_for": ["payment"]}
    )
    async with aiohttp.ClientSession() as client:
        async with client.post(url, json={"amount": 5}) as response:
            assert response.status == 400
            assert (await response.json())["reason"] == "idempotency_key_missing"
    assert payments.hits == 0


async def test_an_unreachable_store_fails_closed(start_server, start_sidecar) -> None:
    payments, _, url = await _stack(
        start_server,
        start_sidecar,
        idempotency={"store": "redis://127.0.0.1:1/0?socket_timeout=0.2"},
    )
    async with aiohttp.ClientSession() as client:
        headers = {"Idempotency-Key": "order-10"}
        async with client.post(url, json={"amount": 5}, headers=headers) as response:
            assert response.status == 503
            body = await response.json()
    assert body["reason"] == "store_unavailable"
    assert body["store"].startswith("redis://127.0.0.1:1/")
    assert payments.hits == 0
