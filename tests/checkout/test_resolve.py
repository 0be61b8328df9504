"""A step whose answer was lost is looked up by its `resolve` read, never sent again.

The payment upstream here does not replay Idempotency-Keys (`replay_keys: false`):
every authorize it receives creates an authorization, as at a provider without key
replay. Such an upstream is configured without retries of its POSTs (a retry is a
re-send too), so the one request the checkout sends is the only one that can act,
and the ledger's request counts show whether the sidecar ever sent another.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.checkout.flow import checkout_id_for
from proxy.checkout.plan import CheckoutPlan
from proxy.config.loader import validate_text
from proxy.simulator import start_simulator
from tests.checkout.conftest import (
    ROOT,
    Rig,
    eventually,
    new_key,
    sidecar_config,
    simulator_config,
)

SIDECAR_YAML = ROOT / "config" / "sidecar.yaml"
PAYMENT_RESOLVE = 'resolve: {method: GET, path: "/authorizations?idempotency_key={{step.key}}"}'
AUTHORIZE = "POST /authorize"
LOOK_UP = "GET /authorizations"

StartSidecar = Callable[..., Awaitable[Any]]


def without_key_replay(data: dict[str, Any]) -> dict[str, Any]:
    """The sidecar config for a payment provider that does not replay keys: no retries."""
    data = copy.deepcopy(data)
    data["upstreams"]["payment"]["retry"] = {"attempts": 1}
    return data


async def started_rig(
    start_sidecar: StartSidecar, tmp_path: Path, *, resolve: bool
) -> AsyncIterator[Rig]:
    async with await start_simulator(simulator_config()) as sim:
        store = f"sqlite://{tmp_path}/sidecar-{uuid.uuid4().hex[:8]}.db"
        data = without_key_replay(sidecar_config(sim, store))
        if not resolve:
            del data["composite"]["checkout"]["steps"]["payment"]["resolve"]
        sidecar, url = await start_sidecar(data)
        sim.set_faults("payment", {"replay_keys": False})
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            yield Rig(sim, sidecar, url, http)


@pytest.fixture
async def rig(start_sidecar: StartSidecar, tmp_path: Path) -> AsyncIterator[Rig]:
    """The shipped config (payment and inventory have `resolve`)."""
    async for running in started_rig(start_sidecar, tmp_path, resolve=True):
        yield running


@pytest.fixture
async def resending_rig(start_sidecar: StartSidecar, tmp_path: Path) -> AsyncIterator[Rig]:
    """The shipped config with payment's `resolve` taken out: a lost authorize is re-sent."""
    async for running in started_rig(start_sidecar, tmp_path, resolve=False):
        yield running


def payment_faults(rig: Rig, fail_next: dict[str, Any]) -> None:
    rig.sim.set_faults("payment", {"replay_keys": False, "fail_next": fail_next})


def requests_to_payment(rig: Rig) -> dict[str, int]:
    """Requests that reached the payment upstream, by route (`POST /authorize`: n)."""
    return dict(rig.sim.stats("payment")["routes"])


def authorizations_under(rig: Rig, key: str) -> list[dict[str, Any]]:
    return [
        auth
        for auth in rig.ledger()["authorizations"].values()
        if auth["idempotency_key"] == f"{key}:payment"
    ]


# -- the lost call acted: found, voided, never re-sent ------------------------------------


async def test_authorize_that_timed_out_after_acting_is_found_and_voided_not_resent(
    rig: Rig, order: dict[str, Any]
) -> None:
    payment_faults(rig, {"count": 1, "kind": "hang_after"})  # authorizes, then never answers
    key = new_key()

    reply = await rig.checkout(order, key=key)

    body = reply.json()
    assert body["decision"] == "rejected", reply.raw
    assert body["failed_steps"] == ["payment"]
    assert body["steps"]["payment"]["status"] == "compensated"
    [auth] = authorizations_under(rig, key)
    assert auth["status"] == "voided"
    assert [h["action"] for h in auth["history"]] == ["authorize", "void"]
    assert requests_to_payment(rig) == {AUTHORIZE: 1, LOOK_UP: 1, "POST /payments/{id}/void": 1}
    assert len(rig.ledger()["authorizations"]) == 1
    [reservation] = rig.ledger()["reservations"].values()
    assert reservation["status"] == "released"


async def test_found_authorization_is_journalled_as_the_steps_result(
    rig: Rig, order: dict[str, Any]
) -> None:
    payment_faults(rig, {"count": 1, "kind": "hang_after"})
    key = new_key()

    reply = await rig.checkout(order, key=key)

    [auth] = authorizations_under(rig, key)
    polled = await rig.poll(reply.json()["checkout_id"])
    assert polled["state"] == "final"
    assert polled["steps"]["payment"]["body"]["id"] == auth["id"]
    # the answer shows what was learned as the journal holds it, so the answer recovery
    # would rebuild from the journal after a crash is the one the client was given
    answered = reply.json()["steps"]["payment"]
    assert answered["body"] == polled["steps"]["payment"]["body"]
    assert answered["http_status"] == polled["steps"]["payment"]["http_status"] == 200


# -- the lost call never acted: 404, nothing to undo ----------------------------------------


async def test_lost_authorize_that_never_acted_is_not_needed_and_nothing_is_voided(
    rig: Rig, order: dict[str, Any]
) -> None:
    payment_faults(rig, {"count": 1, "kind": "hang"})  # times out before authorizing
    key = new_key()

    reply = await rig.checkout(order, key=key)

    body = reply.json()
    assert body["decision"] == "rejected", reply.raw
    assert body["steps"]["payment"]["status"] == "failed"
    assert body.get("pending", []) == []
    ledger = rig.ledger()
    assert ledger["authorizations"] == {} and ledger["voids"] == []
    assert requests_to_payment(rig) == {AUTHORIZE: 1, LOOK_UP: 1}
    polled = await rig.poll(body["checkout_id"])
    assert polled["state"] == "final"
    assert polled["steps"]["payment"]["compensation"] == "not_needed"


# -- the read itself fails: asked again later, still never a re-send ------------------------


async def test_failed_resolve_read_is_queued_and_asked_again_never_resent(
    rig: Rig, order: dict[str, Any]
) -> None:
    # the authorize answers 500 (it may have acted), and so does the first read
    payment_faults(rig, {"count": 2, "status": 500})

    reply = await rig.checkout(order)

    body = reply.json()
    assert body["decision"] == "rejected", reply.raw
    checkout_id = body["checkout_id"]

    async def final() -> bool:
        return (await rig.poll(checkout_id))["state"] == "final"

    await eventually(final)
    assert (await rig.poll(checkout_id))["steps"]["payment"]["compensation"] == "not_needed"
    assert requests_to_payment(rig) == {AUTHORIZE: 1, LOOK_UP: 2}
    assert rig.ledger()["authorizations"] == {}


# -- crash recovery asks the same way ----------------------------------------------------------


async def test_recovered_checkout_finds_what_the_crashed_one_did_by_resolve_alone(
    rig: Rig, order: dict[str, Any]
) -> None:
    flow = rig.sidecar.runtime.flow
    assert flow is not None
    key = new_key()
    record = flow.new_record(checkout_id_for(key), key, key, order, {})
    await flow.journal.create(record)
    # the sidecar died after payment authorized and before it heard of it; the
    # reservation never reached inventory
    auth = rig.sim.ledger.authorize(order["amount"], "EUR", None, f"{key}:payment")

    await rig.sidecar.recovery.recover(record)

    async def final() -> bool:
        return (await rig.poll(record.id))["state"] == "final"

    await eventually(final)
    polled = await rig.poll(record.id)
    assert polled["decision"] == "rejected"
    assert polled["steps"]["payment"]["status"] == "compensated"
    assert polled["steps"]["inventory"]["compensation"] == "not_needed"
    assert auth.status == "voided"
    assert requests_to_payment(rig) == {LOOK_UP: 1, "POST /payments/{id}/void": 1}
    assert rig.sim.stats("inventory")["routes"] == {"GET /reservations": 1}


# -- what resolve prevents --------------------------------------------------------------------


async def test_without_resolve_the_resend_authorizes_a_second_time_then_voids_it(
    resending_rig: Rig, order: dict[str, Any]
) -> None:
    rig = resending_rig
    payment_faults(rig, {"count": 1, "kind": "hang_after"})
    key = new_key()

    await rig.checkout(order, key=key)

    # the re-send made a second hold on the card; only the one it learned of is voided
    assert requests_to_payment(rig)[AUTHORIZE] == 2
    assert sorted(a["status"] for a in authorizations_under(rig, key)) == [
        "authorized",
        "voided",
    ]


# -- config ---------------------------------------------------------------------------------


def validate(text: str) -> list[str]:
    config, errors = validate_text(text, "sidecar.yaml", env={})
    assert (config is None) == bool(errors)
    return [str(e) for e in errors]


def line_of(text: str, needle: str) -> int:
    [line] = [i for i, row in enumerate(text.splitlines(), 1) if needle in row]
    return line


def shipped_with(old: str, new: str) -> str:
    text = SIDECAR_YAML.read_text()
    assert old in text
    return text.replace(old, new, 1)


def test_shipped_config_resolves_payment_and_inventory_by_get() -> None:
    config, errors = validate_text(SIDECAR_YAML.read_text(), str(SIDECAR_YAML), env={})
    assert errors == [] and config is not None and config.composite.checkout is not None

    plan = CheckoutPlan.of(config.composite.checkout)

    resolves = {name: step.resolve for name, step in plan.steps.items() if step.resolve}
    assert sorted(resolves) == ["inventory", "payment"]
    assert {r.method for r in resolves.values()} == {"GET"}
    assert resolves["payment"].path.placeholders() == ("{{step.key}}",)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "HEAD", "get"])
def test_resolve_that_is_not_a_get_is_a_config_error_saying_why(method: str) -> None:
    text = shipped_with(PAYMENT_RESOLVE, PAYMENT_RESOLVE.replace("GET", method))

    assert validate(text) == [
        f"sidecar.yaml:{line_of(text, '/authorizations?')} "
        f"composite.checkout.steps.payment.resolve.method: '{method}' is not allowed: "
        "a resolve only reads whether the step acted, so it must be GET (another method "
        "may act again; HEAD has no body to say what the step did)"
    ]


def test_resolve_without_method_is_a_get() -> None:
    text = shipped_with(PAYMENT_RESOLVE, PAYMENT_RESOLVE.replace("method: GET, ", ""))

    assert validate(text) == []


def test_resolve_reading_the_step_it_resolves_is_a_config_error() -> None:
    text = shipped_with(
        PAYMENT_RESOLVE, PAYMENT_RESOLVE.replace("{{step.key}}", "{{steps.payment.body.id}}")
    )

    [error] = validate(text)
    assert error.startswith(
        f"sidecar.yaml:{line_of(text, '/authorizations?')} "
        "composite.checkout.steps.payment.resolve: placeholder references step 'payment' "
        "itself"
    )


def test_resolve_on_a_step_without_compensate_is_a_config_error() -> None:
    text = shipped_with(
        "        request: {method: POST, path: /quote,",
        '        resolve: {path: "/quotes?key={{step.key}}"}\n'
        "        request: {method: POST, path: /quote,",
    )

    [error] = validate(text)
    assert error.endswith(
        "composite.checkout.steps.shipping: resolve tells the compensate whether a lost "
        "call acted: a step with resolve needs a compensate"
    )


def test_step_key_where_no_step_is_meant_is_a_config_error() -> None:
    text = shipped_with('customer: "{{request.body.customer}}"}}]', 'customer: "{{step.key}}"}}]')

    [error] = validate(text)
    assert "composite.checkout.notify[0].calls[0]: {{step.key}} and {{step.name}} are for" in (
        error
    )


def test_step_key_in_a_steps_own_request_and_compensate_is_valid() -> None:
    text = shipped_with(
        'compensate: {path: "/payments/{{steps.payment.body.id}}/void"}',
        'compensate: {path: "/payments/{{steps.payment.body.id}}/void", '
        'headers: {x-step: "{{step.name}}"}}',
    )

    assert validate(text) == []
