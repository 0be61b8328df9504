"""Payment: the authorize / capture / void / refund state machine and idempotency by key."""

from __future__ import annotations

import aiohttp

from proxy.simulator import Simulator


async def post(http: aiohttp.ClientSession, url: str, body=None, key: str | None = None):
    headers = {"Idempotency-Key": key} if key else {}
    async with http.post(url, json=body, headers=headers) as response:
        return response.status, await response.json(), response.headers


async def authorize(sim, http, amount=1000, key=None, **extra):
    body = {"amount": amount, "currency": "EUR", **extra}
    return await post(http, sim.url("payment") + "/authorize", body, key)


async def test_authorize_answers_201_with_an_auth_id(sim: Simulator, http):
    status, body, _ = await authorize(sim, http, 1234, customer="c1")
    assert status == 201
    assert body["id"].startswith("auth_")
    assert (body["status"], body["amount"], body["currency"]) == ("authorized", 1234, "EUR")
    assert sim.ledger.authorizations[body["id"]].customer == "c1"


async def test_authorize_then_capture(sim, http):
    _, auth, _ = await authorize(sim, http)
    status, body, _ = await post(http, f"{sim.url('payment')}/payments/{auth['id']}/capture")
    assert status == 200
    assert body["status"] == "captured"
    assert body["captured_amount"] == 1000
    assert sim.ledger.counts()["captures"] == 1


async def test_authorize_then_void(sim, http):
    _, auth, _ = await authorize(sim, http)
    status, body, _ = await post(http, f"{sim.url('payment')}/payments/{auth['id']}/void")
    assert (status, body["status"]) == (200, "voided")


async def test_capture_after_void_is_409(sim, http):
    _, auth, _ = await authorize(sim, http)
    base = f"{sim.url('payment')}/payments/{auth['id']}"
    await post(http, base + "/void")
    status, body, _ = await post(http, base + "/capture")
    assert status == 409
    assert body == {
        "error": "invalid_state",
        "id": auth["id"],
        "status": "voided",
        "action": "capture",
    }


async def test_void_after_capture_and_refund_before_capture_are_409(sim, http):
    _, auth, _ = await authorize(sim, http)
    base = f"{sim.url('payment')}/payments/{auth['id']}"
    assert (await post(http, base + "/refund"))[0] == 409
    await post(http, base + "/capture")
    assert (await post(http, base + "/void"))[0] == 409


async def test_refund_after_capture_then_no_second_refund(sim, http):
    _, auth, _ = await authorize(sim, http)
    base = f"{sim.url('payment')}/payments/{auth['id']}"
    await post(http, base + "/capture")
    status, body, _ = await post(http, base + "/refund")
    assert (status, body["status"], body["refunded_amount"]) == (200, "refunded", 1000)
    assert (await post(http, base + "/refund"))[0] == 409


async def test_partial_refund_keeps_captured_until_all_is_refunded(sim, http):
    _, auth, _ = await authorize(sim, http)
    base = f"{sim.url('payment')}/payments/{auth['id']}"
    await post(http, base + "/capture")
    _, body, _ = await post(http, base + "/refund", {"amount": 400})
    assert (body["status"], body["refunded_amount"]) == ("captured", 400)
    assert (await post(http, base + "/refund", {"amount": 700}))[0] == 409
    _, body, _ = await post(http, base + "/refund", {"amount": 600})
    assert (body["status"], body["refunded_amount"]) == ("refunded", 1000)


async def test_unknown_payment_is_404(sim, http):
    status, body, _ = await post(http, sim.url("payment") + "/payments/auth_nope/capture")
    assert (status, body["error"]) == (404, "not_found")


async def test_declined_card_is_402_and_nothing_is_authorized(sim, http):
    status, body, _ = await authorize(sim, http, card="declined")
    assert (status, body) == (402, {"error": "card_declined"})
    assert sim.ledger.counts()["authorizations"] == 0
    assert sim.ledger.counts()["declines"] == 1


async def test_amount_over_the_limit_is_declined(sim, http):
    status, _, _ = await authorize(sim, http, amount=100_001)
    assert status == 402


async def test_invalid_amount_is_400(sim, http):
    status, body, _ = await authorize(sim, http, amount="10")
    assert (status, body["error"]) == (400, "invalid_request")
    assert body["detail"][0]["field"] == "amount"


async def test_same_key_replays_the_answer_without_authorizing_again(sim, http):
    first = await authorize(sim, http, key="k-1")
    second = await authorize(sim, http, key="k-1")
    assert second[0] == first[0] == 201
    assert second[1] == first[1]
    assert second[2]["Idempotent-Replayed"] == "true"
    assert sim.ledger.counts()["authorizations"] == 1
    ledger = await (await http.get(sim.url("inventory") + "/_ledger")).json()
    assert ledger["idempotency_keys"] == {"payment": ["k-1"]}
    assert ledger["authorizations"][first[1]["id"]]["idempotency_key"] == "k-1"


async def test_same_key_with_another_body_is_422(sim, http):
    await authorize(sim, http, 1000, key="k-2")
    status, body, _ = await authorize(sim, http, 2000, key="k-2")
    assert (status, body["error"]) == (422, "idempotency_key_reused")
    assert sim.ledger.counts()["authorizations"] == 1


async def test_same_key_on_another_path_is_422(sim, http):
    _, a, _ = await authorize(sim, http)
    _, b, _ = await authorize(sim, http)
    base = sim.url("payment") + "/payments/"
    assert (await post(http, base + a["id"] + "/capture", key="cap"))[0] == 200
    assert (await post(http, base + b["id"] + "/capture", key="cap"))[0] == 422


async def test_replayed_capture_does_not_capture_twice(sim, http):
    _, auth, _ = await authorize(sim, http)
    url = f"{sim.url('payment')}/payments/{auth['id']}/capture"
    assert (await post(http, url, key="cap-1"))[0] == 200
    assert (await post(http, url, key="cap-1"))[0] == 200  # replay, not a 409
    assert sim.ledger.counts()["captures"] == 1


async def test_replay_keeps_an_error_answer(sim, http):
    first = await authorize(sim, http, card="declined", key="k-3")
    second = await authorize(sim, http, card="declined", key="k-3")
    assert first[0] == second[0] == 402
    assert sim.ledger.counts()["declines"] == 1


async def test_without_a_key_every_request_acts(sim, http):
    await authorize(sim, http)
    await authorize(sim, http)
    assert sim.ledger.counts()["authorizations"] == 2


async def test_keys_are_per_upstream(sim, http):
    await authorize(sim, http, key="shared")
    status, _, _ = await post(
        http, sim.url("inventory") + "/reservations", {"items": [{"sku": "a", "qty": 1}]}, "shared"
    )
    assert status == 201


# -- what an authorize under a key did, read without acting (the checkout's resolve) ------


async def get(http: aiohttp.ClientSession, url: str, **params: str):
    async with http.get(url, params=params) as response:
        return response.status, await response.json()


async def test_authorization_by_key_answers_what_the_authorize_answered(sim, http):
    _, auth, _ = await authorize(sim, http, 1234, key="chk-1:payment")

    status, body = await get(
        http, sim.url("payment") + "/authorizations", idempotency_key="chk-1:payment"
    )

    assert (status, body) == (200, auth)


async def test_authorization_by_key_is_404_when_nothing_was_authorized_under_it(sim, http):
    await authorize(sim, http, key="other-key")

    status, body = await get(http, sim.url("payment") + "/authorizations", idempotency_key="k")

    assert (status, body["error"]) == (404, "not_found")


async def test_declined_authorize_leaves_nothing_to_find_by_its_key(sim, http):
    assert (await authorize(sim, http, card="declined", key="k"))[0] == 402

    status, _ = await get(http, sim.url("payment") + "/authorizations", idempotency_key="k")

    assert status == 404


async def test_authorization_by_key_never_acts(sim, http):
    for _ in range(3):
        await get(http, sim.url("payment") + "/authorizations", idempotency_key="k")

    assert sim.ledger.counts()["authorizations"] == 0
    assert sim.stats("payment")["routes"] == {"GET /authorizations": 3}


async def test_authorization_by_key_without_a_key_is_400(sim, http):
    status, body = await get(http, sim.url("payment") + "/authorizations")

    assert (status, body["error"]) == (400, "idempotency_key_required")


async def test_upstream_not_replaying_keys_authorizes_again_on_a_resend(sim, http):
    sim.set_faults("payment", {"replay_keys": False})

    first = await authorize(sim, http, key="k")
    second = await authorize(sim, http, key="k")

    assert (first[0], second[0]) == (201, 201)
    assert first[1]["id"] != second[1]["id"]
    assert "Idempotent-Replayed" not in second[2]
    assert sim.ledger.counts()["authorizations"] == 2


async def test_several_authorizations_under_one_key_are_409_not_one_of_them(sim, http):
    sim.set_faults("payment", {"replay_keys": False})
    ids = {(await authorize(sim, http, key="k"))[1]["id"] for _ in range(2)}

    status, body = await get(http, sim.url("payment") + "/authorizations", idempotency_key="k")

    assert (status, body["error"], set(body["ids"])) == (409, "several_under_key", ids)
