"""A store that fails while a checkout runs (Redis failing over, say): the client gets
`503 store_unavailable` with `Retry-After`, never a 500, and the key is released, so a
retry with it resumes the checkout at once instead of waiting out the claim."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from typing import Any

import pytest

from proxy.checkout.flow import checkout_id_for
from proxy.checkout.journal import JournalUnavailable
from proxy.checkout.states import CheckoutState
from tests.checkout.conftest import Rig, new_key


async def test_a_journal_failing_mid_checkout_answers_503_and_releases_the_key(
    rig: Rig, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    flow = rig.sidecar.runtime.flow
    assert flow is not None
    journal = flow.journal
    real_update = journal.update

    async def failing_update(checkout_id: str, **fields: Any) -> Any:
        raise JournalUnavailable("redis+sentinel://:***@sentinel:26379/mymaster/0", "READONLY")

    key = new_key()
    monkeypatch.setattr(journal, "update", failing_update)
    refused = await rig.checkout(order, key=key)

    assert refused.status == 503
    body = refused.json()
    assert body["reason"] == "store_unavailable"
    assert body["store"] == "redis+sentinel://:***@sentinel:26379/mymaster/0"
    assert "during the checkout" in body["error"]
    assert refused.headers["Retry-After"] == "1"

    monkeypatch.setattr(journal, "update", real_update)
    retried = await rig.checkout(order, key=key)
    assert retried.status != 409, retried.json()  # the key was released
    assert "checkout_id" in retried.json()  # the checkout's own answer, resumed
    await rig.drained()
    held = [a for a in rig.ledger()["authorizations"].values() if a["status"] == "authorized"]
    assert held == []


async def test_a_record_lost_before_its_decision_is_written_anew_and_the_checkout_goes_on(
    rig: Rig, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that lost an acknowledged write (a Redis failover before the replica had
    it) has no record for the decision. The flow knows everything the record held, so
    it writes the decided record anew and carries on: nothing is left held."""
    flow = rig.sidecar.runtime.flow
    assert flow is not None
    journal = flow.journal
    real_update = journal.update
    database = rig.sidecar.config.store.removeprefix("sqlite://")

    def forget(checkout_id: str) -> None:
        with contextlib.closing(sqlite3.connect(database)) as conn, conn:
            conn.execute("DELETE FROM checkout_journal WHERE id = ?", (checkout_id,))

    async def losing_update(checkout_id: str, **fields: Any) -> Any:
        if "decision" in fields:  # the store lost the record just before the decision
            await asyncio.to_thread(forget, checkout_id)
        return await real_update(checkout_id, **fields)

    monkeypatch.setattr(journal, "update", losing_update)
    key = new_key()
    reply = await rig.checkout(order, key=key)
    assert reply.status == 200, reply.raw
    checkout_id = checkout_id_for(key)
    await flow.final_writes.wait(checkout_id)
    record = await journal.get(checkout_id)
    assert record is not None and record.state == CheckoutState.FINAL, record
    assert record.decision == "confirmed" and not record.pending
    counts = rig.sim.ledger.counts()
    assert counts.get("captured") == 1 and counts.get("committed") == 1, counts
    assert not counts.get("authorized") and not counts.get("reserved"), counts


async def test_a_record_lost_and_written_by_another_answers_503_not_500(
    rig: Rig, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decision finds no record, yet the record cannot be written anew either
    (another writer has one): that is the store failing, not a bug."""
    flow = rig.sidecar.runtime.flow
    assert flow is not None
    journal = flow.journal

    async def lost(checkout_id: str, **fields: Any) -> Any:
        raise KeyError(checkout_id)

    monkeypatch.setattr(journal, "update", lost)
    refused = await rig.checkout(order, key=new_key())
    assert refused.status == 503, refused.raw
    body = refused.json()
    assert body["reason"] == "store_unavailable" and body["store"] == journal.name
    assert "during the checkout" in body["error"]
    assert refused.headers["Retry-After"] == "1"
