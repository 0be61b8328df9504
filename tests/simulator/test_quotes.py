"""Shipping, coupon and fraud: answers without side effects, the same for the same input."""

from __future__ import annotations

from .test_payment import post


async def test_quote_offers_express_and_standard(sim, http):
    body = {"items": [{"sku": "a", "qty": 2}], "address": {"country": "DE"}}
    status, quote, _ = await post(http, sim.url("shipping") + "/quote", body)
    assert status == 200
    prices = {o["service"]: o["price"] for o in quote["options"]}
    assert prices == {"express": 1599, "standard": 599}
    assert (quote["service"], quote["price"]) == ("standard", 599)


async def test_known_coupon_gives_its_discount(sim, http):
    url = sim.url("coupon") + "/validate"
    _, percent, _ = await post(http, url, {"code": "SAVE10", "amount": 2000})
    _, fixed, _ = await post(http, url, {"code": "FIVEOFF", "amount": 300})
    assert percent == {"code": "SAVE10", "valid": True, "discount": 200, "total": 1800}
    assert fixed["discount"] == 300  # never more than the amount


async def test_unknown_coupon_is_200_not_valid(sim, http):
    status, body, _ = await post(
        http, sim.url("coupon") + "/validate", {"code": "NOPE", "amount": 1}
    )
    assert (status, body["valid"], body["discount"]) == (200, False, 0)


async def test_fraud_score_is_deterministic(sim, http):
    order = {"customer": "c1", "amount": 1000, "items": [{"sku": "a", "qty": 1}]}
    _, first, _ = await post(http, sim.url("fraud") + "/score", order)
    _, again, _ = await post(http, sim.url("fraud") + "/score", dict(reversed(order.items())))
    assert first == again
    assert 0 <= first["score"] < 1
    assert first["verdict"] in ("approve", "review", "reject")


async def test_pinned_customer_gets_its_verdict(sim, http):
    _, body, _ = await post(http, sim.url("fraud") + "/score", {"customer": "cust-bad"})
    assert body["verdict"] == "reject"
