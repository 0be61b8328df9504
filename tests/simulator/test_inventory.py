"""Inventory: reservations take stock, release gives it back, short stock is 409."""

from __future__ import annotations

from proxy.simulator import Simulator

from .test_payment import post


async def reserve(sim, http, items, key=None):
    return await post(http, sim.url("inventory") + "/reservations", {"items": items}, key)


async def test_reserve_answers_201_and_takes_stock(sim: Simulator, http):
    status, body, _ = await reserve(sim, http, [{"sku": "sku-1", "qty": 2}])
    assert status == 201
    assert body["id"].startswith("res_")
    assert body["status"] == "reserved"
    assert body["items"] == [{"sku": "sku-1", "qty": 2}]
    assert sim.ledger.available("sku-1") == 3


async def test_unlisted_sku_has_a_million(sim, http):
    async with http.get(sim.url("inventory") + "/stock/anything") as response:
        assert (await response.json())["available"] == 1_000_000


async def test_out_of_stock_is_409_and_takes_nothing(sim, http):
    items = [{"sku": "other", "qty": 1}, {"sku": "sku-1", "qty": 6}]
    status, body, _ = await reserve(sim, http, items)
    assert status == 409
    assert (body["error"], body["sku"]) == ("out_of_stock", "sku-1")
    assert sim.ledger.available("sku-1") == 5
    assert sim.ledger.available("other") == 1_000_000


async def test_release_returns_the_stock(sim, http):
    _, res, _ = await reserve(sim, http, [{"sku": "sku-1", "qty": 5}])
    assert (await reserve(sim, http, [{"sku": "sku-1", "qty": 1}]))[0] == 409
    status, body, _ = await post(http, f"{sim.url('inventory')}/reservations/{res['id']}/release")
    assert (status, body["status"]) == (200, "released")
    assert sim.ledger.available("sku-1") == 5
    assert (await reserve(sim, http, [{"sku": "sku-1", "qty": 1}]))[0] == 201


async def test_commit_keeps_the_stock_taken_and_blocks_release(sim, http):
    _, res, _ = await reserve(sim, http, [{"sku": "sku-1", "qty": 2}])
    base = f"{sim.url('inventory')}/reservations/{res['id']}"
    status, body, _ = await post(http, base + "/commit")
    assert (status, body["status"]) == (200, "committed")
    assert (await post(http, base + "/release"))[0] == 409
    assert sim.ledger.available("sku-1") == 3


async def test_replayed_reservation_takes_stock_once(sim, http):
    first = await reserve(sim, http, [{"sku": "sku-1", "qty": 2}], key="r-1")
    second = await reserve(sim, http, [{"sku": "sku-1", "qty": 2}], key="r-1")
    assert first[1] == second[1]
    assert sim.ledger.available("sku-1") == 3
    assert (await reserve(sim, http, [{"sku": "sku-1", "qty": 3}], key="r-1"))[0] == 422


async def test_unknown_reservation_is_404(sim, http):
    status, _, _ = await post(http, sim.url("inventory") + "/reservations/res_x/release")
    assert status == 404


async def test_empty_reservation_is_400(sim, http):
    assert (await reserve(sim, http, []))[0] == 400


async def test_reservation_by_key_answers_the_reservation_or_404(sim, http):
    _, reservation, _ = await reserve(sim, http, [{"sku": "sku-1", "qty": 1}], key="k:inventory")
    url = sim.url("inventory") + "/reservations"

    async with http.get(url, params={"idempotency_key": "k:inventory"}) as response:
        assert (response.status, await response.json()) == (200, reservation)
    async with http.get(url, params={"idempotency_key": "k:other"}) as response:
        assert response.status == 404
    assert sim.ledger.available("sku-1") == 4  # the reads took no stock
