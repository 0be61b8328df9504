"""`POST /checkout` end to end: the shipped config, the five simulated upstreams, real sockets.

Each test drives one behaviour of the saga and then reads the simulator's ledger,
which is what the payment provider and the warehouse would say happened: what was
authorized, captured, voided, refunded, reserved, committed, released, and with
which idempotency keys. Work the flow hands to the job queue is awaited with a
bounded poll (`eventually`, `Rig.drained`), never a sleep.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from proxy.config.loader import validate_text
from tests.checkout.conftest import FRAUDSTER, ROOT, Rig, eventually, new_key

SIDECAR_YAML = ROOT / "config" / "sidecar.yaml"

STANDARD_SHIPPING = {
    "service": "standard",
    "price": 499,
    "options": [{"service": "standard", "price": 499}],
    "fallback": True,
}


def only(mapping: dict[str, Any]) -> Any:
    """The single value of a one-entry mapping (one authorization, one reservation)."""
    assert len(mapping) == 1, mapping
    return next(iter(mapping.values()))


def topics(rig: Rig, topic: str) -> list[dict[str, Any]]:
    return [n for n in rig.ledger()["notifications"] if n["topic"] == topic]


def unsettled_authorizations(ledger: dict[str, Any]) -> list[str]:
    """Authorizations neither captured nor voided: money held with no order behind it."""
    return [a["id"] for a in ledger["authorizations"].values() if a["status"] == "authorized"]


# -- the happy path ---------------------------------------------------------------------


async def test_confirmed_checkout_answers_every_step_and_its_upstream_body(
    rig: Rig, order: dict[str, Any]
) -> None:
    reply = await rig.checkout(order)

    assert reply.status == 200, reply.raw
    body = reply.json()
    assert body["status"] == "confirmed"
    assert body["checkout_id"].startswith("chk_")
    assert body["degraded"] == []
    steps = body["steps"]
    assert {name: step["status"] for name, step in steps.items()} == {
        "inventory": "ok",
        "payment": "ok",
        "shipping": "ok",
        "coupon": "ok",
        "fraud": "deferred",
    }
    for name in ("inventory", "payment", "shipping", "coupon"):
        assert steps[name]["attempts"] == 1
        assert steps[name]["latency_ms"] >= 0
        assert 200 <= steps[name]["http_status"] < 300
    assert steps["payment"]["body"]["status"] == "authorized"
    assert steps["inventory"]["body"]["status"] == "reserved"
    assert steps["coupon"]["body"] == {
        "code": "SAVE10",
        "valid": True,
        "discount": 1000,
        "total": 9000,
    }
    assert steps["shipping"]["body"]["service"] == "standard"


async def test_confirmed_checkout_captures_the_coupon_total_and_commits_the_reservation(
    rig: Rig, order: dict[str, Any]
) -> None:
    reply = await rig.checkout(order)

    assert reply.status == 200, reply.raw
    ledger = rig.ledger()
    auth = only(ledger["authorizations"])
    assert auth["id"] == reply.json()["steps"]["payment"]["body"]["id"]
    assert auth["status"] == "captured"
    assert ledger["captures"] == [
        {
            "authorization": auth["id"],
            "amount": 9000,
            "idempotency_key": auth["history"][1]["idempotency_key"],
        }
    ]
    assert ledger["voids"] == [] and ledger["refunds"] == []
    assert only(ledger["reservations"])["status"] == "committed"


async def test_every_upstream_call_carries_a_key_derived_from_the_checkouts(
    rig: Rig, order: dict[str, Any]
) -> None:
    key = new_key()

    reply = await rig.checkout(order, key=key)

    assert reply.status == 200, reply.raw
    keys = rig.ledger()["idempotency_keys"]
    assert keys["payment"] == [f"{key}:payment", f"{key}:payment:commit"]
    assert keys["inventory"] == [f"{key}:inventory", f"{key}:inventory:commit"]


# -- requests the sidecar refuses before any upstream call -----------------------------------


async def test_checkout_without_idempotency_key_is_refused_with_400_json(
    rig: Rig, order: dict[str, Any]
) -> None:
    reply = await rig.checkout(order, key="")

    assert reply.status == 400
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.json()["reason"] == "idempotency_key_missing"
    assert sum(rig.hits(name) for name in ("payment", "inventory", "shipping", "coupon")) == 0


async def test_checkout_with_a_body_that_is_not_json_is_refused_with_400(rig: Rig) -> None:
    reply = await rig.checkout(data=b"items=sku-1&amount=10")

    assert reply.status == 400
    assert reply.json()["reason"] == "bad_request"
    assert "not JSON" in reply.json()["error"]


async def test_checkout_missing_a_templated_value_names_the_placeholder_and_calls_nothing(
    rig: Rig, order: dict[str, Any]
) -> None:
    del order["items"]

    reply = await rig.checkout(order)

    assert reply.status == 400
    assert "{{request.body.items}}" in reply.json()["error"]
    assert all(rig.hits(name) == 0 for name in ("payment", "inventory", "shipping", "coupon"))


async def test_key_of_a_refused_bad_request_can_be_reused_once_the_body_is_fixed(
    rig: Rig, order: dict[str, Any]
) -> None:
    key = new_key()
    broken = {k: v for k, v in order.items() if k != "items"}
    assert (await rig.checkout(broken, key=key)).status == 400

    reply = await rig.checkout(order, key=key)

    assert reply.status == 200, reply.raw
    assert reply.json()["status"] == "confirmed"
    assert "Idempotent-Replayed" not in reply.headers


# -- idempotency of the checkout itself --------------------------------------------------------


async def test_repeat_with_same_key_and_body_replays_the_stored_answer_byte_for_byte(
    rig: Rig, order: dict[str, Any]
) -> None:
    key = new_key()
    first = await rig.checkout(order, key=key)
    assert first.status == 200

    again = await rig.checkout(order, key=key)

    assert again.status == 200
    assert again.raw == first.raw
    assert again.headers["Idempotent-Replayed"] == "true"
    ledger = rig.ledger()
    assert len(ledger["authorizations"]) == 1
    assert len(ledger["captures"]) == 1
    assert len(ledger["reservations"]) == 1


async def test_same_key_with_a_different_body_is_422(rig: Rig, order: dict[str, Any]) -> None:
    key = new_key()
    assert (await rig.checkout(order, key=key)).status == 200

    reply = await rig.checkout({**order, "amount": order["amount"] + 1}, key=key)

    assert reply.status == 422
    assert reply.json()["reason"] == "idempotency_key_reused"
    assert len(rig.ledger()["authorizations"]) == 1


async def test_repeat_while_the_first_still_runs_is_409(rig: Rig, order: dict[str, Any]) -> None:
    key = new_key()
    # the first authorize hangs until its per-try timeout; the retry then succeeds
    rig.sim.set_faults("payment", {"fail_next": {"count": 1, "kind": "hang"}})
    first = asyncio.create_task(rig.checkout(order, key=key))
    await rig.sim.wait_for_hits("payment", 1)

    repeat = await rig.checkout(order, key=key)

    assert repeat.status == 409
    assert repeat.json()["reason"] == "idempotency_key_in_progress"
    assert "Retry-After" in repeat.headers
    assert (await first).status == 200


# -- a critical step refuses: reject and undo ------------------------------------------------


async def test_declined_card_rejects_with_409_and_releases_the_reservation(
    rig: Rig, order: dict[str, Any]
) -> None:
    order["card"] = "declined"

    reply = await rig.checkout(order)

    assert reply.status == 409, reply.raw
    body = reply.json()
    assert body["status"] == "rejected"
    assert body["failed_steps"] == ["payment"]
    assert body["steps"]["payment"]["status"] == "failed"
    assert body["steps"]["payment"]["http_status"] == 402
    assert body["steps"]["payment"]["body"] == {"error": "card_declined"}
    ledger = rig.ledger()
    assert only(ledger["reservations"])["status"] == "released"
    assert ledger["stock"]["sku-1"] == 100
    assert ledger["authorizations"] == {} and ledger["captures"] == []


async def test_out_of_stock_rejects_with_409_and_voids_the_authorization(
    rig: Rig, order: dict[str, Any]
) -> None:
    key = new_key()
    order["items"] = [{"sku": "sku-rare", "qty": 5}]

    reply = await rig.checkout(order, key=key)

    assert reply.status == 409, reply.raw
    body = reply.json()
    assert body["failed_steps"] == ["inventory"]
    assert body["steps"]["inventory"]["body"]["error"] == "out_of_stock"
    # the refusal cut the fan-out short: payment either authorized in time and was
    # voided, or was cut off before it acted (and its resolve read said so)
    payment = body["steps"]["payment"]
    await rig.drained()
    ledger = rig.ledger()
    if ledger["authorizations"]:
        assert payment["status"] in ("compensated", "failed")
        auth = only(ledger["authorizations"])
        assert auth["status"] == "voided"
        assert ledger["voids"] == [
            {
                "authorization": auth["id"],
                "amount": order["amount"],
                "idempotency_key": f"{key}:payment:compensate",
            }
        ]
    else:
        assert (payment["status"], payment["reason"]) == ("failed", "cancelled")
        assert ledger["voids"] == []
    assert ledger["captures"] == [] and ledger["reservations"] == {}


# -- a critical step is unavailable ------------------------------------------------------------


async def test_payment_unavailable_is_never_confirmed_and_leaves_nothing_hanging(
    rig: Rig, order: dict[str, Any]
) -> None:
    rig.sim.set_faults("payment", {"error_rate": 1.0, "error_status": 503})

    reply = await rig.checkout(order)

    assert reply.status in (202, 503), reply.raw
    body = reply.json()
    assert body["decision"] == "rejected"
    assert body["status"] != "confirmed"
    rig.sim.set_faults("payment", {})  # healthy again: queued compensations can finish
    await rig.drained()
    assert await rig.dead_letters() == []
    ledger = rig.ledger()
    assert unsettled_authorizations(ledger) == []
    assert ledger["captures"] == []
    assert only(ledger["reservations"])["status"] == "released"


async def test_payment_failing_every_retry_is_503_unavailable_not_a_409_refusal(
    rig: Rig, order: dict[str, Any]
) -> None:
    # exactly the checkout's three attempts fail; the re-ask before the void succeeds
    rig.sim.set_faults("payment", {"fail_next": {"count": 3, "status": 503}})

    reply = await rig.checkout(order)

    assert reply.status == 503, reply.raw
    body = reply.json()
    assert body["failed_steps"] == ["payment"]
    assert "unavailable" in body["error"]
    ledger = rig.ledger()
    assert unsettled_authorizations(ledger) == []
    assert only(ledger["reservations"])["status"] == "released"


async def test_payment_unavailable_checkout_polls_as_final_and_rejected(
    rig: Rig, order: dict[str, Any]
) -> None:
    rig.sim.set_faults("payment", {"error_rate": 1.0, "error_status": 503})
    reply = await rig.checkout(order)
    checkout_id = reply.json()["checkout_id"]
    rig.sim.set_faults("payment", {})

    async def final() -> bool:
        return (await rig.poll(checkout_id))["state"] == "final"

    await eventually(final)
    polled = await rig.poll(checkout_id)
    assert polled["decision"] == "rejected"
    assert polled["status"] == "rejected"
    assert polled["pending"] == []


async def test_open_payment_breaker_rejects_at_once_with_503_and_retry_after(
    rig: Rig, order: dict[str, Any]
) -> None:
    payment = rig.sidecar.runtime.upstreams.get("payment")
    assert payment is not None
    payment.policies.breaker.force_open()
    started = time.monotonic()

    reply = await rig.checkout(order)

    elapsed = time.monotonic() - started
    assert reply.status == 503, reply.raw
    assert int(reply.headers["Retry-After"]) >= 1
    body = reply.json()
    assert body["failed_steps"] == ["payment"]
    assert body["steps"]["payment"]["reason"] == "circuit_open"
    assert rig.hits("payment") == 0
    assert elapsed < 1.0
    # inventory was cut off when payment was refused: nothing is left reserved
    await rig.drained()
    reservations = rig.ledger()["reservations"].values()
    assert all(reservation["status"] == "released" for reservation in reservations)


# -- a non-critical step fails: confirm, degraded -----------------------------------------------


async def test_shipping_down_confirms_with_standard_shipping_as_degraded(
    rig: Rig, order: dict[str, Any]
) -> None:
    rig.sim.set_faults("shipping", {"error_rate": 1.0})

    reply = await rig.checkout(order)

    assert reply.status == 200, reply.raw
    body = reply.json()
    assert body["status"] == "confirmed"
    assert body["degraded"] == ["shipping"]
    assert body["steps"]["shipping"]["status"] == "fallback"
    assert body["steps"]["shipping"]["body"] == STANDARD_SHIPPING


async def test_coupon_down_confirms_and_captures_the_full_amount(
    rig: Rig, order: dict[str, Any]
) -> None:
    rig.sim.set_faults("coupon", {"error_rate": 1.0})

    reply = await rig.checkout(order)

    assert reply.status == 200, reply.raw
    body = reply.json()
    assert body["status"] == "confirmed"
    assert body["degraded"] == ["coupon"]
    assert body["steps"]["coupon"]["status"] == "fallback"
    assert body["steps"]["coupon"]["body"]["total"] == order["amount"]
    assert [c["amount"] for c in rig.ledger()["captures"]] == [order["amount"]]


async def test_deferred_coupon_is_refunded_once_the_coupon_service_recovers(
    rig: Rig, order: dict[str, Any]
) -> None:
    key = new_key()
    rig.sim.set_faults("coupon", {"error_rate": 1.0})
    reply = await rig.checkout(order, key=key)
    assert reply.status == 200, reply.raw
    tried = rig.hits("coupon")
    # the on_fallback job tries while the coupon service is still down, and refunds nothing
    await rig.sim.wait_for_hits("coupon", tried + 1)
    assert rig.ledger()["refunds"] == []

    rig.sim.set_faults("coupon", {})

    async def refunded() -> bool:
        return bool(rig.ledger()["refunds"])

    await eventually(refunded)
    ledger = rig.ledger()
    auth = only(ledger["authorizations"])
    assert ledger["refunds"] == [
        {
            "authorization": auth["id"],
            "amount": 1000,
            "idempotency_key": f"{key}:coupon:on_fallback:1",
        }
    ]
    assert auth["captured_amount"] - auth["refunded_amount"] == 9000


async def test_checkout_without_coupon_skips_the_coupon_service_and_captures_the_full_amount(
    rig: Rig, order: dict[str, Any]
) -> None:
    del order["coupon"]

    reply = await rig.checkout(order)

    assert reply.status == 200, reply.raw
    body = reply.json()
    assert body["steps"]["coupon"]["status"] == "skipped"
    assert body["degraded"] == []
    assert [c["amount"] for c in rig.ledger()["captures"]] == [order["amount"]]
    await rig.drained()
    assert rig.hits("coupon") == 0


# -- async steps and notifications ---------------------------------------------------------------


async def test_fraud_reject_flags_the_confirmed_order_through_the_callback(
    rig: Rig, order: dict[str, Any]
) -> None:
    key = new_key()
    order["customer"] = FRAUDSTER

    reply = await rig.checkout(order, key=key)

    assert reply.status == 200, reply.raw
    assert reply.json()["status"] == "confirmed"
    checkout_id = reply.json()["checkout_id"]

    async def flagged() -> bool:
        return bool(topics(rig, "fraud-flag"))

    await eventually(flagged)
    [flag] = topics(rig, "fraud-flag")
    assert flag["key"] == f"{key}:fraud:callback"
    assert flag["body"]["checkout_id"] == checkout_id
    assert flag["body"]["verdict"] == "reject"


async def test_approved_customer_is_not_flagged(rig: Rig, order: dict[str, Any]) -> None:
    reply = await rig.checkout(order)
    assert reply.status == 200, reply.raw
    checkout_id = reply.json()["checkout_id"]

    async def screened() -> bool:
        fraud = (await rig.poll(checkout_id))["steps"].get("fraud") or {}
        return fraud.get("status") == "ok"

    await eventually(screened)
    await rig.drained()
    assert (await rig.poll(checkout_id))["steps"]["fraud"]["body"]["verdict"] == "approve"
    assert topics(rig, "fraud-flag") == []


async def test_confirmation_email_is_sent_for_a_confirmed_order(
    rig: Rig, order: dict[str, Any]
) -> None:
    key = new_key()
    reply = await rig.checkout(order, key=key)
    assert reply.status == 200, reply.raw

    async def emailed() -> bool:
        return bool(topics(rig, "email"))

    await eventually(emailed)
    [email] = topics(rig, "email")
    assert email["key"] == f"{key}:notify:confirmation-email:0"
    assert email["body"] == {
        "checkout_id": reply.json()["checkout_id"],
        "customer": order["customer"],
    }


async def test_rejected_order_gets_no_confirmation_email(rig: Rig, order: dict[str, Any]) -> None:
    order["card"] = "declined"

    reply = await rig.checkout(order)

    assert reply.status == 409, reply.raw
    await rig.drained()
    assert topics(rig, "email") == []
    assert rig.hits("fraud") == 0


# -- a commit that does not finish inline ---------------------------------------------------------


async def test_failed_capture_answers_202_pending_and_the_queue_confirms_it(
    rig: Rig, order: dict[str, Any]
) -> None:
    # the authorize gets through (held 200 ms); every call after it fails until cleared
    rig.sim.set_faults("payment", {"latency": {"dist": "fixed", "ms": 200}})
    answer = asyncio.create_task(rig.checkout(order))
    await rig.sim.wait_for_hits("payment", 1)
    rig.sim.set_faults("payment", {"error_rate": 1.0})

    reply = await answer

    assert reply.status == 202, reply.raw
    body = reply.json()
    assert body["status"] == "pending"
    assert body["decision"] == "confirmed"
    assert body["poll"] == f"/checkout/{body['checkout_id']}"
    polled = await rig.poll(body["checkout_id"])
    assert polled["state"] != "final"
    assert polled["status"] == "pending"

    rig.sim.set_faults("payment", {})

    async def final() -> bool:
        return (await rig.poll(body["checkout_id"]))["state"] == "final"

    await eventually(final)
    polled = await rig.poll(body["checkout_id"])
    assert polled["decision"] == "confirmed"
    assert polled["status"] == "confirmed"
    ledger = rig.ledger()
    assert len(ledger["captures"]) == 1
    assert only(ledger["authorizations"])["status"] == "captured"


# -- the config ---------------------------------------------------------------------------------


def _line_of(text: str, needle: str) -> int:
    [line] = [i for i, row in enumerate(text.splitlines(), 1) if needle in row]
    return line


def test_shipped_config_is_valid() -> None:
    config, errors = validate_text(SIDECAR_YAML.read_text(), str(SIDECAR_YAML), env={})

    assert errors == []
    assert config is not None and config.composite.checkout is not None


def test_placeholder_naming_an_unknown_step_is_a_config_error_with_its_line() -> None:
    text = SIDECAR_YAML.read_text().replace(
        'compensate: {path: "/payments/{{steps.payment.body.id}}/void"}',
        'compensate: {path: "/payments/{{steps.paymnet.body.id}}/void"}',
    )
    line = _line_of(text, "steps.paymnet.body.id")

    config, errors = validate_text(text, "sidecar.yaml", env={})

    assert config is None
    assert [str(e) for e in errors] == [
        f"sidecar.yaml:{line} composite.checkout.steps.payment.compensate: "
        "placeholder references unknown step 'paymnet'"
    ]


def test_sync_step_reading_another_sync_step_is_a_config_error_with_its_line() -> None:
    original = (
        'request: {method: POST, path: /quote, json: {items: "{{request.body.items}}", '
        'address: "{{request.body.address}}"}}'
    )
    text = SIDECAR_YAML.read_text()
    assert original in text
    text = text.replace(
        original, original.replace("request.body.items", "steps.inventory.body.items")
    )
    line = _line_of(text, "steps.inventory.body.items")

    config, errors = validate_text(text, "sidecar.yaml", env={})

    assert config is None
    [error] = errors
    assert error.line == line
    assert error.path == "composite.checkout.steps.shipping.request"
    assert "'inventory', which runs at the same time" in error.message
