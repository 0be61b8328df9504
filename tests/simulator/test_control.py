"""The `/_*` control routes and the /echo and /bytes helpers, over HTTP."""

from __future__ import annotations

import tracemalloc

from proxy.simulator import Simulator

from .test_payment import authorize, post


async def get_json(http, url):
    async with http.get(url) as response:
        return response.status, await response.json()


async def test_faults_can_be_set_and_read_at_run_time(sim: Simulator, http):
    faults = {"fail_next": {"count": 1, "status": 502}, "latency": {"dist": "fixed", "ms": 1}}
    status, body, _ = await post(http, sim.url("payment") + "/_faults", faults)
    assert status == 200
    assert body["faults"]["fail_next"] == {"count": 1, "status": 502}
    assert body["remaining_failures"] == 1
    assert (await authorize(sim, http))[0] == 502
    _, body = await get_json(http, sim.url("payment") + "/_faults")
    assert body["remaining_failures"] == 0
    await post(http, sim.url("payment") + "/_faults", {})
    assert (await authorize(sim, http))[0] == 201


async def test_posting_faults_sets_only_that_upstream(sim, http):
    await post(http, sim.url("coupon") + "/_faults", {"error_rate": 1})
    assert sim.state.plans["coupon"].faults.error_rate == 1
    assert sim.state.plans["payment"].faults.error_rate == 0


async def test_invalid_faults_are_400_and_change_nothing(sim, http):
    for bad in ({"eror_rate": 1}, {"error_rate": 2}, {"latency": {"dist": "pareto"}}):
        status, body, _ = await post(http, sim.url("payment") + "/_faults", bad)
        assert (status, body["error"]) == (400, "invalid_faults")
    assert (await authorize(sim, http))[0] == 201


async def test_stats_count_requests_that_reached_the_upstream_by_route(sim, http):
    sim.set_faults("payment", {"fail_next": {"count": 1}})
    await authorize(sim, http)
    _, auth, _ = await authorize(sim, http)
    await post(http, f"{sim.url('payment')}/payments/{auth['id']}/capture")
    _, stats = await get_json(http, sim.url("payment") + "/_stats")
    assert stats["total"] == 3
    assert stats["routes"] == {"POST /authorize": 2, "POST /payments/{id}/capture": 1}
    assert stats["faults"] == {"status": 1}
    assert sim.stats("inventory")["total"] == 0


async def test_ledger_is_the_same_on_every_port(sim, http):
    await authorize(sim, http)
    await post(http, sim.url("inventory") + "/reservations", {"items": [{"sku": "a", "qty": 1}]})
    bodies = [(await get_json(http, sim.url(name) + "/_ledger"))[1] for name in sim.ports]
    assert all(body == bodies[0] for body in bodies)
    assert bodies[0]["counts"]["authorizations"] == 1
    assert bodies[0]["counts"]["reservations"] == 1


async def test_reset_clears_ledger_stats_and_faults(sim, http):
    await authorize(sim, http)
    sim.set_faults("payment", {"error_rate": 1.0})
    status, body, _ = await post(http, sim.url("fraud") + "/_reset")
    assert (status, body) == (200, {"reset": True})
    assert sim.ledger.counts()["authorizations"] == 0
    assert sim.stats("payment")["total"] == 0
    assert (await authorize(sim, http))[0] == 201


async def test_echo_reflects_the_request(sim, http):
    async with http.post(
        sim.url("shipping") + "/echo?status=418&a=1", data=b"hello", headers={"X-Test": "yes"}
    ) as response:
        assert response.status == 418
        body = await response.json()
    assert (body["method"], body["path"], body["query"]) == (
        "POST",
        "/echo",
        {"status": "418", "a": "1"},
    )
    assert body["headers"]["X-Test"] == "yes"
    assert (body["body"], body["body_length"]) == ("hello", 5)


async def test_bytes_streams_exactly_n_bytes(sim, http):
    for size in (0, 1, 65_536, 1_000_003):
        async with http.get(f"{sim.url('inventory')}/bytes/{size}") as response:
            assert response.status == 200
            assert response.content_length == size
            received = 0
            async for chunk in response.content.iter_chunked(1 << 16):
                received += len(chunk)
        assert received == size


async def test_bytes_does_not_hold_the_body_in_memory(sim, http):
    size = 32 * 1024 * 1024
    tracemalloc.start()
    try:
        received = 0
        async with http.get(f"{sim.url('inventory')}/bytes/{size}") as response:
            async for chunk in response.content.iter_chunked(1 << 16):
                received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == size
    assert peak < size // 4
