"""Read-only steps (`read_only: true`) start before the checkout is journalled.

The shipped config marks shipping's quote and coupon's validation read-only: they
never act, so they need no journal record first, and starting them before the
claim's write takes that write off the answer's path. The steps that act (payment,
inventory) still start only once the record is durable. A request that does not
run its checkout after all (a replay, a conflict) leaves no step's answer behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy.checkout.plan import CheckoutPlan
from proxy.config.loader import validate_text
from tests.checkout.conftest import ROOT, Rig, new_key

SIDECAR_YAML = ROOT / "config" / "sidecar.yaml"


def _hold_claims(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Hold every checkout at its claim (the first journal write) until the event is set."""
    guard = rig.sidecar.runtime.guard
    assert guard is not None
    release = asyncio.Event()
    claim: Callable[..., Awaitable[Any]] = guard.handle_joint

    async def held(*args: Any, **kwargs: Any) -> Any:
        await release.wait()
        return await claim(*args, **kwargs)

    monkeypatch.setattr(guard, "handle_joint", held)
    return release


async def test_read_only_steps_run_while_the_claim_is_written_and_acting_ones_wait_for_it(
    rig: Rig, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    release = _hold_claims(rig, monkeypatch)

    checkout = asyncio.create_task(rig.checkout(order))
    async with asyncio.timeout(10):
        await rig.sim.wait_for_hits("shipping", 1)
        await rig.sim.wait_for_hits("coupon", 1)
    assert (rig.hits("payment"), rig.hits("inventory")) == (0, 0), "nothing acts unjournalled"
    assert not checkout.done()

    release.set()
    reply = await checkout

    assert reply.status == 200, reply.raw
    steps = reply.json()["steps"]
    assert {n: steps[n]["status"] for n in ("inventory", "payment", "shipping", "coupon")} == {
        "inventory": "ok",
        "payment": "ok",
        "shipping": "ok",
        "coupon": "ok",
    }
    assert steps["coupon"]["body"]["total"] == 9000
    # the early calls were adopted by the fan-out, not sent again; the acting steps made
    # their request and their commit
    assert [rig.hits(n) for n in ("shipping", "coupon", "payment", "inventory")] == [1, 1, 2, 2]


async def test_a_replayed_checkout_acts_nothing_again(rig: Rig, order: dict[str, Any]) -> None:
    key = new_key()
    first = await rig.checkout(order, key=key)
    assert first.status == 200, first.raw
    acting = (rig.hits("payment"), rig.hits("inventory"))

    again = await rig.checkout(order, key=key)

    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert (rig.hits("payment"), rig.hits("inventory")) == acting


async def test_a_key_reused_for_another_order_acts_nothing(rig: Rig, order: dict[str, Any]) -> None:
    key = new_key()
    first = await rig.checkout(order, key=key)
    assert first.status == 200, first.raw
    acting = (rig.hits("payment"), rig.hits("inventory"))

    other = await rig.checkout({**order, "amount": 20_000}, key=key)

    assert other.status == 422, other.raw
    assert other.json()["reason"] == "idempotency_key_reused"
    assert (rig.hits("payment"), rig.hits("inventory")) == acting
    ledger = rig.ledger()
    assert [a["amount"] for a in ledger["authorizations"].values()] == [10_000]


# -- config -------------------------------------------------------------------------------


def _errors(old: str, new: str) -> list[str]:
    text = SIDECAR_YAML.read_text()
    assert old in text
    config, errors = validate_text(text.replace(old, new, 1), "sidecar.yaml", env={})
    assert (config is None) == bool(errors)
    return [str(e) for e in errors]


def test_the_shipped_config_starts_shipping_and_coupon_early() -> None:
    config, errors = validate_text(SIDECAR_YAML.read_text(), str(SIDECAR_YAML), env={})
    assert errors == [] and config is not None and config.composite.checkout is not None

    plan = CheckoutPlan.of(config.composite.checkout)

    assert sorted(s.name for s in plan.early_steps) == ["coupon", "shipping"]
    assert all(s.commit is None and s.compensate is None for s in plan.early_steps)


def test_a_read_only_step_with_a_compensate_is_a_config_error() -> None:
    [error] = _errors(
        "        read_only: true     # a quote never acts",
        '        compensate: {path: "/quotes/{{steps.shipping.body.id}}/drop"}\n'
        "        read_only: true     # a quote never acts",
    )

    assert error.startswith("sidecar.yaml:")
    assert error.endswith(
        "composite.checkout.steps.shipping: a read_only step starts before the checkout is "
        "journalled, so it must never act: it cannot have a commit, compensate or resolve"
    )


def test_an_async_read_only_step_is_a_config_error() -> None:
    [error] = _errors(
        "        mode: async         # screened after the answer",
        "        read_only: true\n        mode: async         # screened after the answer",
    )

    assert error.endswith(
        "composite.checkout.steps.fraud: read_only starts a sync step before the journal "
        "write; an async step runs after the decision anyway"
    )
