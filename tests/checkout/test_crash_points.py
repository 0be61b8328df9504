"""A checkout cut off at each point between its journal writes ends final, or undone.

The saga writes the journal once per phase: the record (with the key's claim where the
stores share a database), the decision with the actions it owes, and at the end the
settled actions with the answer (and the key's answer where it can). The follow-up jobs
are queued while the commits run. Each test stops a checkout at one point, as a crash
would (nothing after that point runs in the request), then lets recovery take the
record up, and checks the simulator's ledger: nothing charged without an order, nothing
charged twice, nothing held; and the client's retry gets the checkout's answer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.checkout.flow import CheckoutFlow, checkout_id_for
from proxy.checkout.journal import CheckoutRecord
from proxy.checkout.recovery import Recovery
from proxy.checkout.states import CheckoutState
from tests.checkout.conftest import Rig, eventually, new_key


class Killed(Exception):
    """Where the process would have died."""


def flow_of(rig: Rig) -> CheckoutFlow:
    flow = rig.sidecar.runtime.flow
    assert flow is not None
    return flow


async def recovered(rig: Rig, checkout_id: str) -> CheckoutRecord:
    """Take the checkout up as recovery does after a crash; wait until it is final."""
    flow = flow_of(rig)
    record = await flow.journal.get(checkout_id)
    assert record is not None
    assert record.state != CheckoutState.FINAL, "the cut-off checkout must be unfinished"
    await Recovery(lambda: flow_of(rig)).recover(record)

    async def final() -> bool:
        found = await flow.journal.get(checkout_id)
        return found is not None and found.state == CheckoutState.FINAL

    await eventually(final, seconds=15)
    done = await flow.journal.get(checkout_id)
    assert done is not None
    return done


def assert_one_order(rig: Rig) -> None:
    """One authorization captured once, one reservation committed, nothing held."""
    counts = rig.sim.ledger.counts()
    assert counts.get("authorizations") == 1, counts
    assert counts.get("captured") == 1 and counts.get("captures") == 1, counts
    assert counts.get("committed") == 1 and not counts.get("reserved"), counts
    assert not counts.get("authorized") and not counts.get("voids"), counts


async def test_a_checkout_cut_off_before_its_commits_is_committed_once_by_recovery(
    rig: Rig, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    flow = flow_of(rig)
    key = new_key()

    async def killed_finish(*args: Any, **kwargs: Any) -> Any:
        raise Killed("before the commits")

    monkeypatch.setattr(flow, "_finish", killed_finish)
    reply = await rig.checkout(order, key=key)
    assert reply.status == 500, reply.raw
    checkout_id = checkout_id_for(key)
    record = await flow.journal.get(checkout_id)
    assert record is not None
    assert record.decision == "confirmed" and record.state == CheckoutState.COMMITTING
    assert set(record.pending) == {
        f"{checkout_id}:inventory:commit",
        f"{checkout_id}:payment:commit",
    }
    monkeypatch.undo()

    done = await recovered(rig, checkout_id)
    assert done.decision == "confirmed" and not done.pending
    await rig.drained(seconds=10)
    assert_one_order(rig)

    retry = await rig.checkout(order, key=key)
    assert retry.status == 200, retry.raw
    assert retry.json()["status"] == "confirmed"


@pytest.mark.parametrize("decision", ["confirmed", "rejected"])
async def test_a_checkout_cut_off_after_its_answer_is_finished_with_that_answer(
    rig: Rig, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch, decision: str
) -> None:
    """Its actions all done inline, a checkout is answered before its final write: the
    process dying then leaves the record as the decision wrote it, actions pending.
    Recovery repeats them under their keys (nothing acts twice) and finishes the record
    with the answer the client already has, which the client's retry is then given."""
    flow = flow_of(rig)
    journal = flow.journal
    real_conclude = journal.conclude

    async def killed_conclude(*args: Any, **kwargs: Any) -> Any:
        raise Killed("before the final write")

    monkeypatch.setattr(journal, "conclude", killed_conclude)
    if decision == "rejected":
        order = {**order, "amount": 900_000}  # over the simulator's decline_over
    key = new_key()
    checkout_id = checkout_id_for(key)
    reply = await rig.checkout(order, key=key)
    assert reply.status == (200 if decision == "confirmed" else 409), reply.raw
    assert reply.json()["decision"] == decision
    await flow.final_writes.wait(checkout_id)  # the write that "died" has ended

    record = await journal.get(checkout_id)
    assert record is not None and record.decision == decision
    owed = (
        {"inventory:commit", "payment:commit"}
        if decision == "confirmed"
        else {"inventory:compensate"}
    )
    assert set(record.pending) == {f"{checkout_id}:{action}" for action in owed}
    counts = rig.sim.ledger.counts()
    if decision == "confirmed":  # the commits ran before the cut: a repeat must not act
        assert counts.get("captures") == 1, counts
    else:
        assert counts.get("released") == 1 and not counts.get("authorizations"), counts
    monkeypatch.setattr(journal, "conclude", real_conclude)

    done = await recovered(rig, checkout_id)
    assert done.decision == decision and not done.pending
    await rig.drained(seconds=10)
    if decision == "confirmed":
        assert_one_order(rig)
    else:
        counts = rig.sim.ledger.counts()
        assert counts.get("released") == 1 and not counts.get("reserved"), counts

    retry = await rig.checkout(order, key=key)
    assert retry.headers.get("Idempotent-Replayed") == "true", retry.raw
    assert (retry.status, retry.json()) == (reply.status, reply.json())


async def test_follow_up_jobs_lost_with_the_process_are_queued_by_recovery(
    rig: Rig, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut off after the decision, before its follow-up jobs (fraud screening, the
    confirmation email) were queued: the record is not final, so recovery queues them."""
    flow = flow_of(rig)
    key = new_key()

    async def killed_enqueue(*args: Any, **kwargs: Any) -> None:
        raise Killed("before the follow-up jobs")

    monkeypatch.setattr(flow, "enqueue_after", killed_enqueue)
    reply = await rig.checkout(order, key=key)
    assert reply.status == 500, reply.raw
    checkout_id = checkout_id_for(key)
    monkeypatch.undo()

    await recovered(rig, checkout_id)
    await rig.drained(seconds=10)
    assert_one_order(rig)
    assert rig.hits("fraud") >= 1, "the fraud screening was queued by recovery"
    emails = [n for n in rig.sim.ledger.notifications if "email" in str(n)]
    assert emails, rig.sim.ledger.notifications


async def test_a_whole_checkout_keeps_its_key_answer_with_its_last_write(
    rig: Rig, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SQLite store shares the journal's file: the key's answer is written by the
    journal's final transaction (no separate `complete`), and a repeat is replayed."""
    guard = rig.sidecar.runtime.guard
    assert guard is not None

    async def no_complete(*args: Any) -> None:
        raise AssertionError("the key's answer was written apart from the journal's")

    monkeypatch.setattr(guard.store, "complete", no_complete)
    key = new_key()
    first = await rig.checkout(order, key=key)
    assert first.status == 200, first.raw
    again = await rig.checkout(order, key=key)
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.raw == first.raw
    record = await flow_of(rig).journal.get(checkout_id_for(key))
    assert record is not None and record.state == CheckoutState.FINAL and not record.pending


async def test_the_answer_goes_before_the_final_write_and_a_repeat_waits_for_that_write(
    rig: Rig, order: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answered while its final write is held: the record is not final yet. A repeat of
    the request and a poll, sent meanwhile to the same sidecar, wait for the write and
    get the answer, replayed, and the final record; not 409 and an unfinished one."""
    flow = flow_of(rig)
    journal, writes = flow.journal, flow.final_writes
    real_conclude, real_wait = journal.conclude, writes.wait
    land = asyncio.Event()
    waiting: list[str] = []
    two_waiting = asyncio.Event()

    async def held_conclude(*args: Any, **kwargs: Any) -> Any:
        await land.wait()
        return await real_conclude(*args, **kwargs)

    async def counted_wait(checkout_id: str, *args: Any) -> None:
        if checkout_id in writes:
            waiting.append(checkout_id)
            if len(waiting) == 2:
                two_waiting.set()
        await real_wait(checkout_id, *args)

    monkeypatch.setattr(journal, "conclude", held_conclude)
    monkeypatch.setattr(writes, "wait", counted_wait)
    key = new_key()
    checkout_id = checkout_id_for(key)
    first = await asyncio.wait_for(rig.checkout(order, key=key), timeout=30)
    assert first.status == 200, first.raw
    record = await journal.get(checkout_id)
    assert record is not None and record.state == CheckoutState.COMMITTING, record

    repeat = asyncio.create_task(rig.checkout(order, key=key))
    poll = asyncio.create_task(rig.poll(checkout_id))
    await asyncio.wait_for(two_waiting.wait(), timeout=30)
    land.set()
    again, polled = await repeat, await poll
    assert again.headers.get("Idempotent-Replayed") == "true", again.raw
    assert again.raw == first.raw
    assert polled["state"] == CheckoutState.FINAL and polled["status"] == "confirmed", polled
