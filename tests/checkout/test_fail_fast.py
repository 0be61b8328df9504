"""A critical step that failed for good ends the fan-out: the answer does not wait
for the slowest step, and what the others did is undone."""

from __future__ import annotations

import time
from typing import Any

from tests.checkout.conftest import Rig

SHIPPING_TOTAL = 1.0
"""The shipped config's `timeout.total` of shipping: how long a hanging quote is waited for."""


async def test_a_declined_card_answers_without_waiting_for_a_slow_step(
    rig: Rig, order: dict[str, Any]
) -> None:
    rig.sim.set_faults("shipping", {"hang_rate": 1.0})  # answers only at its timeout
    order["card"] = "declined"

    started = time.monotonic()
    reply = await rig.checkout(order)
    took = time.monotonic() - started

    assert reply.status == 409, reply.raw
    body = reply.json()
    assert body["failed_steps"] == ["payment"]
    assert body["error"] == "payment refused the order; every side effect was undone"
    # the slow step was cut off, not waited for, and is listed as cut off
    assert took < SHIPPING_TOTAL, f"answered after {took:.2f}s: it waited for shipping"
    assert body["steps"]["shipping"]["status"] == "failed"
    assert body["steps"]["shipping"]["reason"] == "cancelled"
    await rig.drained()
    counts = rig.sim.ledger.counts()
    assert not counts.get("reserved") and not counts.get("authorized"), counts


async def test_a_non_critical_failure_does_not_cut_the_fan_out_short(
    rig: Rig, order: dict[str, Any]
) -> None:
    rig.sim.set_faults("coupon", {"error_rate": 1.0})
    rig.sim.set_faults("shipping", {"latency": {"dist": "fixed", "ms": 300}})

    reply = await rig.checkout(order)

    assert reply.status == 200, reply.raw
    body = reply.json()
    assert body["steps"]["shipping"]["status"] == "ok"
    assert "coupon" in body["degraded"]
