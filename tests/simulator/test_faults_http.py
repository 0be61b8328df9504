"""Faults on live sockets: what a client of a faulty upstream actually sees."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from proxy.simulator import Simulator

from .test_payment import authorize, post

BODY = {"amount": 1000, "currency": "EUR"}


async def test_fail_next_fails_exactly_n_then_succeeds(sim: Simulator, http):
    sim.set_faults("payment", {"fail_next": {"count": 2, "status": 503}})
    statuses = [(await authorize(sim, http))[0] for _ in range(3)]
    assert statuses == [503, 503, 201]
    assert sim.ledger.counts()["authorizations"] == 1


async def test_injected_error_does_not_use_up_the_key(sim, http):
    sim.set_faults("payment", {"fail_next": {"count": 1}})
    assert (await authorize(sim, http, key="k"))[0] == 503
    status, _, headers = await authorize(sim, http, key="k")
    assert status == 201
    assert "Idempotent-Replayed" not in headers


async def test_error_rate_one_always_answers_error_status_with_retry_after(sim, http):
    sim.set_faults("payment", {"error_rate": 1.0, "error_status": 429, "retry_after": 3})
    for _ in range(3):
        status, body, headers = await authorize(sim, http)
        assert (status, body["error"], headers["Retry-After"]) == (429, "injected_fault", "3")
    assert sim.ledger.counts()["authorizations"] == 0


async def test_error_rate_defaults_to_503(sim, http):
    sim.set_faults("shipping", {"error_rate": 1.0})
    status, _, headers = await post(http, sim.url("shipping") + "/quote", {})
    assert status == 503
    assert "Retry-After" not in headers


async def test_reset_drops_the_connection(sim, http):
    sim.set_faults("payment", {"reset_rate": 1.0})
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await authorize(sim, http)
    assert sim.ledger.counts()["authorizations"] == 0


async def test_fail_next_reset_then_succeeds(sim, http):
    sim.set_faults("payment", {"fail_next": {"count": 1, "kind": "reset"}})
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await authorize(sim, http)
    assert (await authorize(sim, http))[0] == 201


async def test_reset_after_acts_and_loses_the_answer_which_the_key_recovers(sim, http):
    sim.set_faults("payment", {"fail_next": {"count": 1, "kind": "reset_after"}})
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await authorize(sim, http, key="lost")
    assert sim.ledger.counts()["authorizations"] == 1
    status, body, headers = await authorize(sim, http, key="lost")
    assert (status, headers["Idempotent-Replayed"]) == (201, "true")
    assert body["id"] in sim.ledger.authorizations
    assert sim.ledger.counts()["authorizations"] == 1


async def test_hang_never_answers_so_the_client_times_out(sim, http):
    sim.set_faults("payment", {"hang_rate": 1.0})
    timeout = aiohttp.ClientTimeout(total=0.3)
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(sim.url("payment") + "/authorize", json=BODY, timeout=timeout):
            pass
    assert sim.ledger.counts()["authorizations"] == 0


async def test_fail_next_hang_then_succeeds(sim, http):
    sim.set_faults("payment", {"fail_next": {"count": 1, "kind": "hang"}})
    timeout = aiohttp.ClientTimeout(total=0.2)
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(sim.url("payment") + "/authorize", json=BODY, timeout=timeout):
            pass
    assert (await authorize(sim, http))[0] == 201


async def test_close_releases_hanging_requests(http):
    from proxy.simulator import start_simulator

    simulator = await start_simulator({"upstreams": {"fraud": {"hang_rate": 1.0}}})
    request = asyncio.ensure_future(http.post(simulator.url("fraud") + "/score", json={}))
    await simulator.wait_for_hits("fraud", 1)  # the request now hangs in the server
    started = time.monotonic()
    await simulator.close()
    assert time.monotonic() - started < 1.5  # well under the shutdown backstop
    with pytest.raises(aiohttp.ClientError):
        await request


async def test_wait_for_hits_sees_concurrent_hanging_requests(sim, http):
    sim.set_faults("payment", {"hang_rate": 1.0})
    timeout = aiohttp.ClientTimeout(total=5)
    calls = [
        asyncio.ensure_future(
            http.post(sim.url("payment") + "/authorize", json=BODY, timeout=timeout)
        )
        for _ in range(3)
    ]
    await asyncio.wait_for(sim.wait_for_hits("payment", 3), 5)
    assert sim.stats("payment")["faults"] == {"hang": 3}
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)


async def test_fixed_latency_delays_at_least_that_long(sim, http):
    sim.set_faults("coupon", {"latency": {"dist": "fixed", "ms": 100}})
    started = time.monotonic()
    status, _, _ = await post(http, sim.url("coupon") + "/validate", {"code": "X", "amount": 1})
    assert status == 200
    assert time.monotonic() - started >= 0.095  # event loop timers may fire a hair early


async def test_slow_body_sends_the_whole_body_slowly(sim, http):
    sim.set_faults("shipping", {"slow_body_rate": 1.0, "slow_body_bytes_per_s": 500})
    started = time.monotonic()
    status, quote, _ = await post(http, sim.url("shipping") + "/quote", {})
    assert status == 200
    assert quote["service"] == "standard"
    assert time.monotonic() - started >= 0.09  # ~100 bytes of JSON at 500 B/s


async def test_slow_body_throttles_streamed_bytes(sim, http):
    sim.set_faults("fraud", {"slow_body_rate": 1.0, "slow_body_bytes_per_s": 10_000})
    started = time.monotonic()
    async with http.get(sim.url("fraud") + "/bytes/3000") as response:
        assert len(await response.read()) == 3000
    assert time.monotonic() - started >= 0.18  # the last of 3 chunks leaves after 2 pauses


async def test_faults_do_not_touch_control_routes(sim, http):
    sim.set_faults("payment", {"error_rate": 1.0, "reset_rate": 1.0, "hang_rate": 1.0})
    for path in ("/_ledger", "/_stats", "/_faults"):
        async with http.get(sim.url("payment") + path) as response:
            assert response.status == 200


async def test_faults_of_one_upstream_leave_the_others_alone(sim, http):
    sim.set_faults("payment", {"error_rate": 1.0})
    status, _, _ = await post(http, sim.url("coupon") + "/validate", {"code": "X", "amount": 1})
    assert status == 200


async def test_hang_after_acts_then_never_answers_so_the_client_times_out(sim, http):
    sim.set_faults("payment", {"fail_next": {"count": 1, "kind": "hang_after"}})
    timeout = aiohttp.ClientTimeout(total=0.3)
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(
            sim.url("payment") + "/authorize",
            json=BODY,
            headers={"Idempotency-Key": "lost"},
            timeout=timeout,
        ):
            pass
    [auth] = sim.ledger.authorizations.values()
    assert auth.idempotency_key == "lost"
    assert sim.state.injected["payment"]["hang_after"] == 1
