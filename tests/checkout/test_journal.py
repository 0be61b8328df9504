"""The checkout journal: one behavioural suite, run against memory, SQLite, real Redis and
real PostgreSQL.

Time is a FakeClock passed as the journal's wall clock: it stamps `created_at` and
decides what `unfinished` finds old enough, so no test sleeps. Redis expiry is the
server's own and is checked through the key's TTL.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from proxy.checkout.journal import (
    DEFAULT_TTL,
    CheckoutRecord,
    Journal,
    OutboxEvent,
    cursor_of,
)
from proxy.resilience.clock import FakeClock
from proxy.storage.errors import StoreUnavailable
from proxy.storage.open import open_journal
from tests.postgres import fresh_schema, schema_url

REDIS_URL = "redis://127.0.0.1:6379/0"
TTL = 3600.0


@dataclass
class Backend:
    """How to open a journal of one kind, on a clock the test controls."""

    kind: str
    url: str
    clock: FakeClock

    async def open(self) -> Journal:
        return await open_journal(self.url, wall=self.clock)


async def _redis_reachable() -> bool:
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


@pytest.fixture(params=["memory", "sqlite", "redis", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    clock = FakeClock(1_700_000_000.0)
    kind = request.param
    if kind == "memory":
        yield Backend(kind, f"memory://?ttl={TTL}", clock)
    elif kind == "sqlite":
        yield Backend(kind, f"sqlite:///{tmp_path}/j.db?ttl={TTL}", clock)
    elif kind == "postgresql":
        async with fresh_schema() as schema:
            yield Backend(kind, schema_url(schema, ttl=str(TTL)), clock)
    else:
        if not await _redis_reachable():
            pytest.skip(f"no Redis at {REDIS_URL}")
        prefix = f"test-journal-{uuid.uuid4().hex}:"
        yield Backend(kind, f"{REDIS_URL}?prefix={prefix}&ttl={TTL}", clock)
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            async for name in client.scan_iter(match=f"{prefix}*"):
                await client.delete(name)
        finally:
            await client.aclose()


@pytest.fixture
async def journal(backend: Backend) -> AsyncIterator[Journal]:
    opened = await backend.open()
    yield opened
    await opened.close()


def a_record(checkout_id: str = "co-1", **fields: object) -> CheckoutRecord:
    values: dict[str, object] = {
        "key": f"key-{checkout_id}",
        "request": {"body": {"items": [], "total": 12.5}, "headers": {"x-customer": "c1"}},
        "trace": {"traceparent": "00-abc-def-01"},
    }
    values.update(fields)
    return CheckoutRecord(id=checkout_id, **values)  # type: ignore[arg-type]


# -- create / get / update ------------------------------------------------------------------


async def test_create_then_get_returns_the_same_record(journal: Journal, backend: Backend) -> None:
    record = a_record(steps={"payment": {"status": "ok", "body": {"ids": []}}})
    assert await journal.create(record)

    stored = await journal.get("co-1")

    assert stored == CheckoutRecord(
        id="co-1",
        key="key-co-1",
        state="started",
        request={"body": {"items": [], "total": 12.5}, "headers": {"x-customer": "c1"}},
        steps={"payment": {"status": "ok", "body": {"ids": []}}},
        trace={"traceparent": "00-abc-def-01"},
        created_at=backend.clock.now,
        updated_at=backend.clock.now,
    )


async def test_get_of_an_unknown_id_is_none(journal: Journal) -> None:
    assert await journal.get("nope") is None


async def test_create_of_an_existing_id_is_refused_and_keeps_the_first(
    journal: Journal,
) -> None:
    assert await journal.create(a_record(key="first"))
    assert not await journal.create(a_record(key="second", state="decided"))

    stored = await journal.get("co-1")
    assert stored is not None
    assert (stored.key, stored.state) == ("first", "started")


async def test_update_sets_fields_and_updated_at(journal: Journal, backend: Backend) -> None:
    await journal.create(a_record())
    created_at = backend.clock.now
    backend.clock.advance(5)

    returned = await journal.update(
        "co-1", state="decided", decision="confirmed", outcome="confirmed"
    )

    stored = await journal.get("co-1")
    assert stored == returned
    assert (stored.state, stored.decision, stored.outcome) == ("decided", "confirmed", "confirmed")
    assert stored.created_at == created_at
    assert stored.updated_at == created_at + 5
    assert stored.key == "key-co-1"  # untouched fields stay


async def test_update_of_a_missing_record_raises_key_error(journal: Journal) -> None:
    with pytest.raises(KeyError):
        await journal.update("nope", state="decided")


async def test_update_replaces_steps_and_pending_whole(journal: Journal) -> None:
    await journal.create(a_record(steps={"payment": {"status": "ok", "attempts": 2}}))
    await journal.add_pending("co-1", {"old": {}})

    await journal.update(
        "co-1",
        state="decided",
        steps={"payment": {"status": "failed"}, "coupon": {}},
        pending={"p1": {"kind": "void"}, "p2": {"kind": "release"}},
    )

    stored = await journal.get("co-1")
    assert stored is not None
    assert stored.steps == {"payment": {"status": "failed"}, "coupon": {}}
    assert stored.pending == {"p1": {"kind": "void"}, "p2": {"kind": "release"}}
    assert await journal.resolve_pending("co-1", "old") == 2
    assert await journal.resolve_pending("co-1", "p1") == 1
    await journal.update("co-1", pending={})
    assert await journal.finish_if_done("co-1")


async def test_update_refuses_fields_it_does_not_own(journal: Journal) -> None:
    await journal.create(a_record())
    with pytest.raises(TypeError, match="created_at"):
        await journal.update("co-1", created_at=0.0)
    with pytest.raises(ValueError, match="state"):
        await journal.update("co-1", state="finished")


# -- steps and pending actions ---------------------------------------------------------------


async def test_set_step_merges_into_the_step(journal: Journal) -> None:
    await journal.create(a_record())

    await journal.set_step("co-1", "payment", {"status": "ok", "http_status": 201, "attempts": 1})
    await journal.set_step("co-1", "payment", {"status": "captured", "body": {"id": "p-1"}})
    await journal.set_step("co-1", "shipping", {})

    stored = await journal.get("co-1")
    assert stored is not None
    assert stored.steps == {
        "payment": {"status": "captured", "http_status": 201, "attempts": 1, "body": {"id": "p-1"}},
        "shipping": {},
    }


async def test_set_step_of_a_missing_record_raises_key_error(journal: Journal) -> None:
    with pytest.raises(KeyError):
        await journal.set_step("nope", "payment", {"status": "ok"})


async def test_resolve_pending_counts_down_and_merges_step_fields(journal: Journal) -> None:
    await journal.create(a_record())
    await journal.set_step("co-1", "payment", {"status": "ok"})
    await journal.add_pending(
        "co-1",
        {
            "payment:commit": {"step": "payment", "kind": "commit"},
            "inventory:commit": {"step": "inventory", "kind": "commit"},
        },
    )

    first = await journal.resolve_pending(
        "co-1", "payment:commit", step="payment", step_fields={"commit": "done"}
    )
    again = await journal.resolve_pending("co-1", "payment:commit")
    last = await journal.resolve_pending("co-1", "inventory:commit")

    assert (first, again, last) == (1, 1, 0)
    stored = await journal.get("co-1")
    assert stored is not None
    assert stored.pending == {}
    assert stored.steps["payment"] == {"status": "ok", "commit": "done"}


async def test_add_pending_twice_for_one_action_keeps_one(journal: Journal) -> None:
    await journal.create(a_record())
    await journal.add_pending("co-1", {"payment:void": {"attempt": 1}})
    await journal.add_pending("co-1", {"payment:void": {"attempt": 2}})

    stored = await journal.get("co-1")
    assert stored is not None
    assert stored.pending == {"payment:void": {"attempt": 2}}
    assert await journal.resolve_pending("co-1", "payment:void") == 0


async def test_concurrent_resolves_lose_no_update(journal: Journal, backend: Backend) -> None:
    """50 workers finish actions of one checkout at once, through two journal objects
    where the backend is shared (two threads on one SQLite file, two Redis clients)."""
    other = await backend.open() if backend.kind != "memory" else journal
    try:
        await journal.create(a_record())
        actions = {f"a{i}": {"n": i} for i in range(50)}
        await journal.add_pending("co-1", actions)

        remaining = await asyncio.gather(
            *(
                (journal if i % 2 else other).resolve_pending(
                    "co-1",
                    f"a{i}",
                    step="payment" if i % 3 else f"step{i}",
                    step_fields={f"f{i}": i},
                )
                for i in range(50)
            )
        )
    finally:
        if other is not journal:
            await other.close()

    assert sorted(remaining) == list(range(50))
    stored = await journal.get("co-1")
    assert stored is not None
    assert stored.pending == {}
    assert stored.steps["payment"] == {f"f{i}": i for i in range(50) if i % 3}
    assert {name: s for name, s in stored.steps.items() if name != "payment"} == {
        f"step{i}": {f"f{i}": i} for i in range(50) if not i % 3
    }


async def test_concurrent_set_step_merges_every_field(journal: Journal) -> None:
    await journal.create(a_record())

    await asyncio.gather(*(journal.set_step("co-1", "payment", {f"k{i}": i}) for i in range(50)))

    stored = await journal.get("co-1")
    assert stored is not None
    assert stored.steps["payment"] == {f"k{i}": i for i in range(50)}


# -- finishing -----------------------------------------------------------------------------


async def test_finish_if_done_waits_for_pending_and_happens_once(journal: Journal) -> None:
    await journal.create(a_record(state="committing"))
    await journal.add_pending("co-1", {"payment:commit": {}})
    response = {"status": 201, "body": {"order": "o-1", "lines": []}}

    assert not await journal.finish_if_done("co-1", response)
    await journal.resolve_pending("co-1", "payment:commit")
    assert await journal.finish_if_done("co-1", response)
    assert not await journal.finish_if_done("co-1", {"status": 500, "body": {}})

    stored = await journal.get("co-1")
    assert stored is not None
    assert stored.state == "final"
    assert stored.response == response


async def test_concurrent_finish_if_done_is_true_for_one_caller(journal: Journal) -> None:
    await journal.create(a_record())
    results = await asyncio.gather(*(journal.finish_if_done("co-1") for _ in range(20)))
    assert results.count(True) == 1


async def test_finish_if_done_without_response_keeps_the_stored_one(journal: Journal) -> None:
    await journal.create(a_record(response={"status": 409, "body": {}}))
    assert await journal.finish_if_done("co-1")
    stored = await journal.get("co-1")
    assert stored is not None
    assert stored.response == {"status": 409, "body": {}}


# -- recovery --------------------------------------------------------------------------------


async def test_unfinished_returns_old_enough_non_final_records_oldest_first(
    journal: Journal, backend: Backend
) -> None:
    for name in ("c1", "c2", "c3", "c4"):
        await journal.create(a_record(name))
        backend.clock.advance(10)
    await journal.update("c2", state="final")
    await journal.create(a_record("c5"))  # created just now: too young
    backend.clock.advance(5)

    found = await journal.unfinished(older_than=10)

    assert [record.id for record in found] == ["c1", "c3", "c4"]
    assert found[0].request == a_record().request


async def test_unfinished_respects_the_limit(journal: Journal, backend: Backend) -> None:
    for i in range(5):
        await journal.create(a_record(f"c{i}"))
        backend.clock.advance(1)

    found = await journal.unfinished(older_than=0, limit=2)

    assert [record.id for record in found] == ["c0", "c1"]
    assert await journal.unfinished(older_than=0, limit=0) == []


async def test_unfinished_pages_with_a_cursor_and_ties_are_not_lost(
    journal: Journal, backend: Backend
) -> None:
    # three share one created_at: the cursor is (created_at, id), so a page that ends
    # inside the tie goes on after the id it stopped at
    for name in ("t-b", "t-a", "t-c"):
        await journal.create(a_record(name))
    for i in range(4):
        backend.clock.advance(1)
        await journal.create(a_record(f"c{i}"))
    backend.clock.advance(1)

    seen: list[str] = []
    after = None
    while True:
        page = await journal.unfinished(older_than=0, limit=2, after=after)
        seen += [record.id for record in page]
        if len(page) < 2:
            break
        after = cursor_of(page[-1])

    assert seen == ["t-a", "t-b", "t-c", "c0", "c1", "c2", "c3"]


async def test_a_finished_record_is_not_unfinished(journal: Journal, backend: Backend) -> None:
    await journal.create(a_record())
    backend.clock.advance(60)
    assert [record.id for record in await journal.unfinished(older_than=30)] == ["co-1"]

    assert await journal.finish_if_done("co-1")

    assert await journal.unfinished(older_than=30) == []


async def test_a_record_made_unfinished_again_is_found_again(
    journal: Journal, backend: Backend
) -> None:
    await journal.create(a_record(state="final"))
    backend.clock.advance(60)
    assert await journal.unfinished(older_than=30) == []

    await journal.update("co-1", state="compensating")

    assert [record.id for record in await journal.unfinished(older_than=30)] == ["co-1"]


async def test_records_survive_reopening_the_journal(backend: Backend) -> None:
    if backend.kind == "memory":
        pytest.skip("memory:// lives and dies with its process")
    first = await backend.open()
    await first.create(a_record())
    await first.set_step("co-1", "payment", {"status": "ok"})
    await first.add_pending("co-1", {"payment:void": {"step": "payment"}})
    await first.close()

    second = await backend.open()
    try:
        stored = await second.get("co-1")
        assert stored is not None
        assert stored.steps == {"payment": {"status": "ok"}}
        assert stored.pending == {"payment:void": {"step": "payment"}}
        assert [record.id for record in await second.unfinished(older_than=0)] == ["co-1"]
    finally:
        await second.close()


# -- retention ----------------------------------------------------------------------------------


async def test_final_records_expire_after_the_ttl(journal: Journal, backend: Backend) -> None:
    await journal.create(a_record("done"))
    await journal.create(a_record("open"))
    assert await journal.finish_if_done("done")

    if backend.kind == "redis":
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            prefix = backend.url.split("prefix=")[1].split("&")[0]
            done_ttl = await client.pttl(f"{prefix}checkout:done")
            open_ttl = await client.pttl(f"{prefix}checkout:open")
        finally:
            await client.aclose()
        assert 0 < done_ttl <= TTL * 1000
        assert open_ttl == -1  # no expiry
        return

    backend.clock.advance(TTL - 1)
    assert await journal.get("done") is not None
    backend.clock.advance(2)
    assert await journal.get("done") is None
    backend.clock.advance(DEFAULT_TTL * 10)
    assert await journal.get("open") is not None  # unfinished records never expire
    with pytest.raises(KeyError):
        await journal.set_step("done", "payment", {})


async def test_an_expired_id_can_be_created_again(journal: Journal, backend: Backend) -> None:
    if backend.kind == "redis":
        pytest.skip("Redis expiry is the server's own; covered by the TTL check")
    await journal.create(a_record(state="final"))
    backend.clock.advance(TTL + 1)
    assert await journal.create(a_record(key="again"))
    stored = await journal.get("co-1")
    assert stored is not None
    assert stored.key == "again"


# -- failures ----------------------------------------------------------------------------------


# -- the events outbox ------------------------------------------------------------------------


def an_event(checkout_id: str = "co-1", kind: str = "checkout.confirmed") -> OutboxEvent:
    body = {"id": f"{checkout_id}:{kind}", "type": kind, "data": {"checkout_id": checkout_id}}
    return OutboxEvent(f"{checkout_id}:{kind}", checkout_id, kind, body)


async def test_the_decision_write_carries_its_events(journal: Journal) -> None:
    await journal.create(a_record())
    event = an_event()

    record = await journal.update("co-1", state="decided", decision="confirmed", events=[event])

    assert (record.state, record.decision) == ("decided", "confirmed")
    assert await journal.unsent_events() == [event]
    assert await journal.outbox_pending() == 1


async def test_a_failed_decision_write_leaves_no_event(journal: Journal) -> None:
    with pytest.raises(KeyError):
        await journal.update("missing", state="decided", events=[an_event("missing")])
    await journal.create(a_record())
    with pytest.raises(TypeError):
        await journal.update("co-1", id="other", events=[an_event()])

    assert await journal.unsent_events() == []
    assert await journal.outbox_pending() == 0


async def test_finish_writes_its_events_only_for_the_caller_that_finished(
    journal: Journal,
) -> None:
    await journal.create(a_record(pending={"a": {"step": "payment"}}))
    event = an_event(kind="checkout.compensated")
    assert not await journal.finish_if_done("co-1", events=[event])
    assert await journal.unsent_events() == []

    await journal.resolve_pending("co-1", "a")
    results = await asyncio.gather(
        *(journal.finish_if_done("co-1", events=[event]) for _ in range(5))
    )

    assert sum(results) == 1
    assert await journal.unsent_events() == [event]


async def test_conclude_settles_the_actions_and_finishes_with_the_answer_and_events(
    journal: Journal,
) -> None:
    pending = {"p:commit": {"step": "payment"}, "i:commit": {"step": "inventory"}}
    await journal.create(a_record(state="committing", pending=pending))
    await journal.set_step("co-1", "payment", {"status": "ok"})
    event = an_event(kind="checkout.confirmed")
    answer = {"status": 200, "body": {"status": "confirmed"}, "headers": {}}

    finished = await journal.conclude(
        "co-1",
        {"p:commit": ("payment", {"committed": True}), "i:commit": ("inventory", {"x": 1})},
        answer,
        events=[event],
    )

    assert finished
    stored = await journal.get("co-1")
    assert stored is not None
    assert (stored.state, stored.pending, stored.response) == ("final", {}, answer)
    assert stored.steps["payment"] == {"status": "ok", "committed": True}
    assert stored.steps["inventory"] == {"x": 1}
    assert await journal.unsent_events() == [event]
    # a second conclude (a repeat) changes nothing and writes no event
    assert not await journal.conclude("co-1", {}, {"status": 500, "body": {}}, events=[event])
    again = await journal.get("co-1")
    assert again is not None and again.response == answer
    assert await journal.outbox_pending() == 1


async def test_conclude_with_actions_still_owed_keeps_the_answer_and_stays_unfinished(
    journal: Journal,
) -> None:
    pending = {"p:commit": {"step": "payment"}, "i:commit": {"step": "inventory"}}
    await journal.create(a_record(state="committing", pending=pending))
    answer = {"status": 202, "body": {"status": "pending"}, "headers": {}}

    finished = await journal.conclude(
        "co-1", {"p:commit": ("payment", {"committed": True})}, answer, events=[an_event()]
    )

    assert not finished
    stored = await journal.get("co-1")
    assert stored is not None
    assert (stored.state, set(stored.pending), stored.response) == (
        "committing",
        {"i:commit"},
        answer,
    )
    assert await journal.unsent_events() == []
    assert await journal.resolve_pending("co-1", "i:commit") == 0
    assert await journal.finish_if_done("co-1")


async def test_conclude_of_a_missing_record_raises_key_error(journal: Journal) -> None:
    with pytest.raises(KeyError):
        await journal.conclude("missing", {}, {"status": 200, "body": {}})


async def test_unsent_events_are_listed_oldest_first_within_the_limit(journal: Journal) -> None:
    written = []
    for i in range(5):
        await journal.create(a_record(f"co-{i}"))
        event = an_event(f"co-{i}")
        await journal.update(f"co-{i}", decision="confirmed", events=[event])
        written.append(event)
    await journal.add_events("co-0", [an_event("co-0"), an_event("co-0", "checkout.fraud_flagged")])

    assert await journal.unsent_events(limit=3) == written[:3]
    assert await journal.unsent_events(limit=10) == [
        *written,
        an_event("co-0", "checkout.fraud_flagged"),
    ]


async def test_events_marked_sent_leave_the_outbox(journal: Journal) -> None:
    for i in range(3):
        await journal.create(a_record(f"co-{i}"))
        await journal.update(f"co-{i}", decision="confirmed", events=[an_event(f"co-{i}")])

    await journal.mark_events_sent(["co-0:checkout.confirmed", "co-2:checkout.confirmed", "nope"])

    assert await journal.unsent_events() == [an_event("co-1")]
    assert await journal.outbox_pending() == 1
    await journal.mark_events_sent([])
    assert await journal.outbox_pending() == 1


async def test_add_events_of_a_missing_record_raises_key_error(journal: Journal) -> None:
    with pytest.raises(KeyError):
        await journal.add_events("missing", [an_event("missing")])
    assert await journal.outbox_pending() == 0


async def test_unsent_events_survive_reopening_the_journal(backend: Backend) -> None:
    if backend.kind == "memory":
        pytest.skip("memory:// is one process's journal")
    first = await backend.open()
    await first.create(a_record())
    await first.update("co-1", decision="rejected", events=[an_event(kind="checkout.rejected")])
    await first.close()

    second = await backend.open()
    try:
        assert await second.unsent_events() == [an_event(kind="checkout.rejected")]
    finally:
        await second.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_unreachable_redis_raises_store_unavailable_naming_the_redacted_url() -> None:
    port = _free_port()
    url = (
        f"redis://user:s3cret@127.0.0.1:{port}/0"
        "?prefix=x:&socket_timeout=0.2&socket_connect_timeout=0.2"
    )
    journal = await open_journal(url)
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await journal.create(a_record())
        with pytest.raises(StoreUnavailable):
            await journal.get("co-1")
        with pytest.raises(StoreUnavailable):
            await journal.unfinished(older_than=0)
    finally:
        await journal.close()

    assert time.monotonic() - started < 5
    assert caught.value.store == journal.name == f"redis://user:***@127.0.0.1:{port}/0"
    assert journal.name in str(caught.value)
    assert "s3cret" not in str(caught.value)


async def test_unusable_sqlite_file_raises_store_unavailable(tmp_path: Path) -> None:
    journal = await open_journal(f"sqlite:///{tmp_path}/missing-dir/j.db")
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await journal.get("co-1")
    finally:
        await journal.close()
    assert caught.value.store == journal.name


async def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match=r"mysql://user:\*\*\*@h/db") as caught:
        await open_journal("mysql://user:s3cret@h/db")
    assert "s3cret" not in str(caught.value)
