"""Recovery takes up what another process left: when its deadline passes, and it
answers the client's retry with the final answer at once."""

from __future__ import annotations

import json
import time
from typing import Any

from proxy.checkout.flow import CheckoutFlow, checkout_id_for
from proxy.checkout.recovery import Recovery
from proxy.checkout.states import CheckoutState
from proxy.idempotency import KeyIdentity
from proxy.idempotency.guard import fingerprint, scoped_key
from tests.checkout.conftest import Rig, eventually, new_key


def flow_of(rig: Rig) -> CheckoutFlow:
    flow = rig.sidecar.runtime.flow
    assert flow is not None
    return flow


async def journalled_by_a_dead_replica(
    rig: Rig, key: str, order: dict[str, Any], *, age: float
) -> tuple[str, KeyIdentity]:
    """What a replica killed right after journalling leaves: the journal record and its
    claim on the key, both `age` seconds old, and nothing else."""
    flow = flow_of(rig)
    raw = json.dumps(order).encode()
    identity = KeyIdentity(
        scoped_key("checkout", "", key), fingerprint("POST", "/checkout", raw, "application/json")
    )
    guard = rig.sidecar.runtime.guard
    assert guard is not None
    claim = await guard.store.claim(identity.key, identity.fingerprint, 60.0)
    assert claim.state.value == "claimed"
    record = flow.new_record(checkout_id_for(key), key, key, order, {}, identity)
    record.created_at = record.updated_at = time.time() - age
    assert await flow.journal.create(record)
    return record.id, identity


async def test_a_young_unfinished_checkout_gets_a_timer_and_is_taken_up_when_due(
    rig: Rig, order: dict[str, Any]
) -> None:
    flow = flow_of(rig)
    checkout_id, _ = await journalled_by_a_dead_replica(
        rig, new_key(), order, age=flow.plan.deadline - 0.3
    )
    recovery = Recovery(lambda: flow_of(rig), margin=0.0)
    try:
        assert await recovery.scan_once() == 0, "not abandoned yet: nothing taken up"
        assert recovery.timers == 1

        async def decided() -> bool:
            record = await flow.journal.get(checkout_id)
            return record is not None and record.decision is not None

        await eventually(decided, seconds=5)
        assert recovery.timers == 0
    finally:
        await recovery.stop()


async def test_a_retry_of_a_recovered_checkout_gets_its_final_answer_at_once(
    rig: Rig, order: dict[str, Any]
) -> None:
    key = new_key()
    flow = flow_of(rig)
    checkout_id, _ = await journalled_by_a_dead_replica(rig, key, order, age=flow.plan.deadline + 5)
    recovery = Recovery(lambda: flow_of(rig))
    try:
        assert await recovery.scan_once() == 1

        async def final() -> bool:
            record = await flow.journal.get(checkout_id)
            return record is not None and record.state == CheckoutState.FINAL

        await eventually(final, seconds=10)
    finally:
        await recovery.stop()

    # the dead request's claim would still hold for a minute: the retry is replayed
    reply = await rig.checkout(order, key=key)
    assert reply.headers.get("Idempotent-Replayed") == "true", reply.raw
    body = reply.json()
    assert reply.status == 503
    assert body["checkout_id"] == checkout_id
    assert (body["status"], body["decision"], body["degraded"]) == ("rejected", "rejected", [])
    assert body["error"] == (
        "the checkout was interrupted before its decision (the sidecar stopped); "
        "every side effect was undone"
    )
    assert set(body["steps"]) == {"payment", "inventory"} or body["steps"] is not None
    # nothing it may have done is left: no authorization held, no stock reserved
    counts = rig.sim.ledger.counts()
    assert not counts.get("authorized") and not counts.get("reserved"), counts
