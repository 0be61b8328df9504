"""The PostgreSQL journal's one-round-trip path: a change is written from the record the
journal remembers, with a compare-and-set on the row's revision.

A remembered record can be stale whenever anyone else wrote the row: another journal
object (another replica, a job worker), or a sidecar too old to know revisions. These
tests make it stale on purpose and check that no change is ever lost, that a failed
compare-and-set writes none of its outbox events or joint statements, and that rows
from before the revision column work.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

import proxy.storage.postgres as pg
from proxy.checkout.journal import CheckoutRecord, OutboxEvent
from proxy.checkout.journal_postgres import PostgresJournal
from proxy.idempotency.postgres_store import PostgresStore
from proxy.idempotency.store import ClaimState
from proxy.resilience.clock import FakeClock
from proxy.storage.joint import JointInsert
from proxy.storage.open import open_idempotency_store, open_journal
from proxy.storage.postgres import Conflict
from tests.postgres import PG_URL, fresh_schema, schema_url

TTL = 3600.0


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    async with fresh_schema() as name:
        yield name


async def _journal(schema: str, clock: FakeClock) -> PostgresJournal:
    journal = await open_journal(schema_url(schema, ttl=str(TTL)), wall=clock)
    assert isinstance(journal, PostgresJournal)
    return journal


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
async def journals(schema: str, clock: FakeClock) -> AsyncIterator[tuple[PostgresJournal, ...]]:
    """Two journal objects on one schema: two replicas, or a flow and a job worker."""
    first, second = await _journal(schema, clock), await _journal(schema, clock)
    yield first, second
    await first.close()
    await second.close()


async def _sql(query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as conn:
        cursor = await conn.execute(query, params)
        return await cursor.fetchall() if cursor.description else []


def _record(checkout_id: str = "co-1") -> CheckoutRecord:
    return CheckoutRecord(id=checkout_id, key=f"key-{checkout_id}", request={"n": 1})


def _event(event_id: str, checkout_id: str = "co-1") -> OutboxEvent:
    return OutboxEvent(event_id, checkout_id, "checkout.decided", {"n": 1})


async def test_a_change_from_another_journal_is_never_overwritten(
    journals: tuple[PostgresJournal, PostgresJournal],
) -> None:
    mine, theirs = journals
    assert await mine.create(_record())
    await mine.update("co-1", state="decided")  # remembered by `mine`
    await theirs.set_step("co-1", "payment", {"status": "ok"})  # `mine` is now stale
    await mine.set_step("co-1", "inventory", {"status": "ok"})
    await theirs.add_pending("co-1", {"a1": {"job": "commit"}})
    assert await mine.resolve_pending("co-1", "a1", step="payment", step_fields={"c": 1}) == 0

    record = await theirs.get("co-1")
    assert record is not None
    assert record.state == "decided"
    assert record.steps == {"payment": {"status": "ok", "c": 1}, "inventory": {"status": "ok"}}
    assert record.pending == {}


async def test_a_writer_that_knows_no_revisions_still_invalidates_the_remembered_record(
    schema: str, journals: tuple[PostgresJournal, PostgresJournal]
) -> None:
    """An older sidecar writes the row without touching `revision`: the trigger bumps it."""
    mine, _ = journals
    assert await mine.create(_record())
    await mine.update("co-1", decision="commit")
    rows = await _sql(f'SELECT record FROM "{schema}".checkout_journal WHERE id = %s', ("co-1",))
    data = rows[0][0]
    data["steps"]["legacy"] = {"status": "ok"}
    await _sql(
        f'UPDATE "{schema}".checkout_journal SET record = %s::jsonb WHERE id = %s',
        (json.dumps(data), "co-1"),
    )
    await mine.set_step("co-1", "payment", {"status": "ok"})
    record = await mine.get("co-1")
    assert record is not None
    assert record.steps == {"legacy": {"status": "ok"}, "payment": {"status": "ok"}}
    assert record.decision == "commit"


async def test_a_failed_compare_and_set_writes_no_event_and_no_joint_statement(
    schema: str, journals: tuple[PostgresJournal, PostgresJournal]
) -> None:
    mine, theirs = journals
    await _sql(f'CREATE TABLE "{schema}".marks (n integer)')
    mark = JointInsert(mine._db.database, f'INSERT INTO "{schema}".marks VALUES (%s)', (1,))
    assert await mine.create(_record())
    await mine.update("co-1", state="decided")
    stale = mine._known["co-1"]
    await theirs.set_step("co-1", "payment", {"status": "ok"})

    def change(data: dict[str, Any], now: float) -> bool:
        data["state"] = "final"
        return True

    with pytest.raises(Conflict):
        await mine._change_known("co-1", stale, change, lambda _: [_event("e1")], [mark])
    assert await _sql(f'SELECT n FROM "{schema}".marks') == []
    assert await mine.outbox_pending() == 0
    record = await mine.get("co-1")
    assert record is not None and record.state == "decided" and "payment" in record.steps

    # the public call falls back to the locking path and writes everything once
    answer = {"status": 200, "body": {}, "headers": {}}
    mine._known["co-1"] = stale
    assert await mine.conclude("co-1", {}, answer, events=[_event("e1")], joint=[mark])
    assert await _sql(f'SELECT n FROM "{schema}".marks') == [(1,)]
    assert [e.id for e in await mine.unsent_events()] == ["e1"]
    record = await mine.get("co-1")
    assert record is not None and record.is_final and "payment" in record.steps


async def test_the_usual_change_is_one_write_from_the_remembered_record(
    journals: tuple[PostgresJournal, PostgresJournal],
) -> None:
    """After create, changes use (and refresh) the remembered record, a final one too:
    an async step writes its result into the final record just after."""
    mine, _ = journals
    assert await mine.create(_record())
    first = mine._known["co-1"][0]
    await mine.update("co-1", state="decided")
    assert mine._known["co-1"][0] == first + 1  # the CAS matched: no fallback needed
    await mine.add_events("co-1", [_event("e1")])
    assert mine._known["co-1"][0] == first + 2
    assert await mine.finish_if_done("co-1", {"status": 200}, events=[_event("e2")])
    assert mine._known["co-1"][0] == first + 3
    assert sorted(e.id for e in await mine.unsent_events()) == ["e1", "e2"]
    await mine.set_step("co-1", "fraud", {"status": "ok", "body": {"verdict": "accept"}})
    assert mine._known["co-1"][0] == first + 4  # no fallback for the final record either
    record = await mine.get("co-1")
    assert record is not None and record.is_final and record.steps["fraud"]["status"] == "ok"


async def test_a_record_deleted_or_expired_meanwhile_is_a_key_error(
    schema: str, journals: tuple[PostgresJournal, PostgresJournal]
) -> None:
    mine, _ = journals
    assert await mine.create(_record())
    await _sql(f'DELETE FROM "{schema}".checkout_journal WHERE id = %s', ("co-1",))
    with pytest.raises(KeyError):
        await mine.update("co-1", state="decided")
    assert "co-1" not in mine._known


async def test_a_record_written_before_revisions_existed_works(
    schema: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schema at migration 3 with a row in it, then upgraded by opening the journal."""
    older = tuple(m for m in pg.MIGRATIONS if m.version < 4)
    async with await psycopg.AsyncConnection.connect(PG_URL) as conn:
        with monkeypatch.context() as patch:
            patch.setattr(pg, "MIGRATIONS", older)
            assert await pg.migrate(conn, f'"{schema}"') == [1, 2, 3]
    data = _record().to_dict() | {"created_at": clock(), "updated_at": clock()}
    await _sql(
        f'INSERT INTO "{schema}".checkout_journal (id, state, created_at, expires_at, record)'
        " VALUES (%s, %s, %s, NULL, %s::jsonb)",
        ("co-1", "started", clock(), json.dumps(data)),
    )
    journal = await _journal(schema, clock)
    try:
        await journal.update("co-1", state="decided")  # the locking path
        await journal.set_step("co-1", "payment", {"status": "ok"})  # the remembered one
        record = await journal.get("co-1")
        assert record is not None
        assert record.state == "decided" and record.steps == {"payment": {"status": "ok"}}
        assert record.request == {"n": 1}
    finally:
        await journal.close()


async def test_the_claim_and_first_record_commit_together_and_a_taken_key_inserts_nothing(
    schema: str, clock: FakeClock
) -> None:
    store = open_idempotency_store(schema_url(schema), clock=clock)
    journal = await _journal(schema, clock)
    try:
        assert isinstance(store, PostgresStore)
        claimed = await store.claim_joint("k", "fp", 60, journal.joint_create(_record("co-1")))
        assert claimed.state is ClaimState.CLAIMED and claimed.joint
        await journal.update("co-1", state="decided")  # remembered from joint_create

        busy = await store.claim_joint("k", "fp", 60, journal.joint_create(_record("co-2")))
        assert busy.state is ClaimState.IN_PROGRESS and not busy.joint
        assert await journal.get("co-2") is None
        other = await store.claim_joint("k", "other", 60, journal.joint_create(_record("co-3")))
        assert other.state is ClaimState.MISMATCH and await journal.get("co-3") is None
        assert (await store.claim("k2", "fp", 60)).state is ClaimState.CLAIMED
        assert (await store.claim("k2", "fp", 60)).state is ClaimState.IN_PROGRESS
    finally:
        await store.close()
        await journal.close()
