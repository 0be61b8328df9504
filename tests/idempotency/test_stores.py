"""Store backends directly: claim states, atomicity across store objects, outages."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.idempotency import (
    ClaimState,
    IdempotencyStore,
    StoredResponse,
    StoreUnavailable,
)
from proxy.resilience.clock import FakeClock
from proxy.storage.open import open_idempotency_store
from proxy.storage.sweep import SWEEP_EVERY
from proxy.storage.url import redact_url
from tests.postgres import row_count

from .conftest import Backend, Harness

RESPONSE = StoredResponse(200, [("Content-Type", "text/plain")], b"\x00done\xff")


async def test_claim_complete_replay_cycle(store: IdempotencyStore) -> None:
    assert (await store.claim("k", "fp", 60)).state is ClaimState.CLAIMED
    await store.complete("k", "fp", RESPONSE, 3600)
    found = await store.claim("k", "fp", 60)
    assert found.state is ClaimState.COMPLETED
    assert found.response == RESPONSE


async def test_other_fingerprint_is_a_mismatch_in_progress_and_completed(
    store: IdempotencyStore,
) -> None:
    await store.claim("k", "fp", 60)
    assert (await store.claim("k", "other", 60)).state is ClaimState.MISMATCH
    await store.complete("k", "fp", RESPONSE, 3600)
    assert (await store.claim("k", "other", 60)).state is ClaimState.MISMATCH


async def test_in_progress_reports_remaining_lease(store: IdempotencyStore) -> None:
    await store.claim("k", "fp", 60)
    found = await store.claim("k", "fp", 60)
    assert found.state is ClaimState.IN_PROGRESS
    assert 0 < found.retry_after <= 60


async def test_abandon_frees_a_claim_but_keeps_a_completed_record(
    store: IdempotencyStore,
) -> None:
    await store.claim("k", "fp", 60)
    await store.abandon("k")
    assert (await store.claim("k", "fp", 60)).state is ClaimState.CLAIMED
    await store.complete("k", "fp", RESPONSE, 3600)
    await store.abandon("k")
    assert (await store.claim("k", "fp", 60)).state is ClaimState.COMPLETED


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgresql"], indirect=True)
async def test_concurrent_claims_through_separate_store_objects_admit_one(
    backend: Backend,
) -> None:
    """Like separate sidecar processes on one file, one Redis or one PostgreSQL (memory://
    shares nothing)."""
    stores = [backend.open() for _ in range(5)]
    try:
        results = await asyncio.gather(
            *(s.claim("contended", "fp", 60) for s in stores for _ in range(10))
        )
    finally:
        for s in stores:
            await s.close()
    states = [r.state for r in results]
    assert states.count(ClaimState.CLAIMED) == 1
    assert states.count(ClaimState.IN_PROGRESS) == 49


async def test_sqlite_records_survive_reopening_the_store(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/state.db"
    first = open_idempotency_store(url)
    await first.claim("done", "fp", 60)
    await first.complete("done", "fp", RESPONSE, 3600)
    await first.claim("running", "fp", 60)
    await first.close()

    reopened = open_idempotency_store(url)
    try:
        found = await reopened.claim("done", "fp", 60)
        assert found.state is ClaimState.COMPLETED
        assert found.response == RESPONSE
        assert (await reopened.claim("running", "fp", 60)).state is ClaimState.IN_PROGRESS
    finally:
        await reopened.close()


async def test_sqlite_expiry_uses_persisted_wall_clock_timestamps(tmp_path: Path) -> None:
    clock = FakeClock(1_700_000_000.0)
    url = f"sqlite://{tmp_path}/state.db"
    first = open_idempotency_store(url, clock=clock)
    await first.claim("k", "fp", 60)
    await first.complete("k", "fp", RESPONSE, 100)
    await first.close()

    clock.advance(101)
    reopened = open_idempotency_store(url, clock=clock)
    try:
        assert (await reopened.claim("k", "fp", 60)).state is ClaimState.CLAIMED
    finally:
        await reopened.close()


async def test_sqlite_lock_is_unavailable_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = open_idempotency_store(f"sqlite://{path}?timeout=0.05")
    await store.claim("warm", "fp", 60)  # creates the file and schema
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailable) as caught:
            await store.claim("k", "fp", 60)
        assert caught.value.store == f"sqlite://{path}"
        blocker.execute("ROLLBACK")
        assert (await store.claim("k", "fp", 60)).state is ClaimState.CLAIMED
    finally:
        blocker.close()
        await store.close()


async def test_unopenable_sqlite_file_answers_503_and_does_not_run(
    tmp_path: Path, make_harness: object
) -> None:
    url = f"sqlite://{tmp_path}/missing-dir/state.db"
    store = open_idempotency_store(url)
    try:
        harness: Harness = await make_harness(store)  # type: ignore[operator]
        status, _, body = await harness.post("key-1")
        assert status == 503
        assert b'"reason": "store_unavailable"' in body
        assert url.encode() in body
        assert harness.upstream.calls == 0
        assert harness.results == ["store_unavailable"]
    finally:
        await store.close()


def test_store_names_hide_secrets() -> None:
    assert (
        redact_url("redis://user:s3cret@cache:6379/2?password=x&prefix=p")
        == "redis://user:***@cache:6379/2"
    )
    assert redact_url("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact_url("redis://127.0.0.1:6379/0?prefix=a:") == "redis://127.0.0.1:6379/0"
    assert redact_url("sqlite:///var/lib/x.db") == "sqlite:///var/lib/x.db"


async def test_open_store_names_each_backend_without_secrets(tmp_path: Path) -> None:
    stores = [
        open_idempotency_store("memory://"),
        open_idempotency_store(f"sqlite://{tmp_path}/a.db"),
        open_idempotency_store("redis://:pw@127.0.0.1:6379/3?prefix=x:"),
    ]
    try:
        assert [s.name for s in stores] == [
            "memory://",
            f"sqlite://{tmp_path}/a.db",
            "redis://:***@127.0.0.1:6379/3",
        ]
        assert all(isinstance(s, IdempotencyStore) for s in stores)
    finally:
        for s in stores:
            await s.close()


def test_unknown_store_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="memory://"):
        open_idempotency_store("mysql://db/x")


async def test_memory_store_is_bounded() -> None:
    store = open_idempotency_store("memory://?maxsize=2", clock=FakeClock())
    for key in ("a", "b", "c"):
        await store.claim(key, "fp", 60)
    assert (await store.claim("a", "fp", 60)).state is ClaimState.CLAIMED  # evicted


@given(
    status=st.integers(100, 599),
    headers=st.lists(st.tuples(st.text(min_size=1), st.text())),
    body=st.binary(),
)
def test_stored_response_round_trips_through_json(
    status: int, headers: list[tuple[str, str]], body: bytes
) -> None:
    response = StoredResponse(status, headers, body)
    assert StoredResponse.from_json(response.to_json()) == response


async def test_sqlite_claim_and_journal_record_commit_together_in_one_file(
    tmp_path: Path,
) -> None:
    """`store: sqlite:///path`: the claim and the checkout's first record are one
    transaction; a key already claimed inserts nothing; a failing insert takes the claim
    back with it."""
    from proxy.checkout.journal import CheckoutRecord, JointJournal
    from proxy.idempotency.store import JointClaims, JointCompletes
    from proxy.storage.joint import JointInsert
    from proxy.storage.open import open_journal

    url = f"sqlite://{tmp_path}/state.db"
    store = open_idempotency_store(url)
    journal = await open_journal(url)
    other = await open_journal(f"sqlite://{tmp_path}/other.db")
    try:
        assert isinstance(store, JointClaims) and isinstance(store, JointCompletes)
        assert isinstance(journal, JointJournal)
        insert = journal.joint_create(CheckoutRecord(id="chk-1", key="k"))
        assert store.accepts(insert)
        assert not store.accepts(other.joint_create(CheckoutRecord(id="chk-1", key="k")))

        claimed = await store.claim_joint("k", "fp", 60, insert)
        assert claimed.state is ClaimState.CLAIMED and claimed.joint
        assert (await journal.get("chk-1")) is not None
        busy = await store.claim_joint("k", "fp", 60, insert)
        assert busy.state is ClaimState.IN_PROGRESS and not busy.joint

        broken = JointInsert(insert.database, "INSERT INTO no_such_table VALUES (?)", (1,))
        with pytest.raises(StoreUnavailable):
            await store.claim_joint("k2", "fp", 60, broken)
        assert (await store.claim("k2", "fp", 60)).state is ClaimState.CLAIMED  # rolled back

        # the key's answer, run by the journal's final write in its own transaction
        statements = store.joint_complete("k", "fp", RESPONSE, 3600)
        assert all(journal.accepts(s) for s in statements)
        answer = {"status": 200, "body": {}, "headers": {}}
        assert await journal.conclude("chk-1", {}, answer, joint=statements)
        replay = await store.claim("k", "fp", 60)
        assert replay.state is ClaimState.COMPLETED and replay.response == RESPONSE
    finally:
        await store.close()
        await journal.close()
        await other.close()


async def test_sql_stores_still_sweep_expired_records_with_a_later_completion(
    backend: Backend,
) -> None:
    """The sweep rides with at most one completion per `SWEEP_EVERY`; the first one
    after the records expired (and the interval passed) removes them."""
    if backend.kind not in ("sqlite", "postgresql"):
        pytest.skip("the SQL stores sweep; memory is bounded, Redis expires keys itself")
    assert backend.clock is not None
    store = backend.open()
    try:
        for key in ("old-1", "old-2"):
            await store.claim(key, "fp", 60)
            await store.complete(key, "fp", RESPONSE, 100)
        await store.claim("new", "fp", 60)
        assert await _record_count(backend) == 3

        backend.clock.advance(100 + SWEEP_EVERY)
        await store.complete("new", "fp", RESPONSE, 100)

        assert await _record_count(backend) == 1
    finally:
        await store.close()


async def _record_count(backend: Backend) -> int:
    if backend.kind == "sqlite":
        path = backend.url.removeprefix("sqlite://")
        with sqlite3.connect(path) as conn:
            return int(conn.execute("SELECT count(*) FROM idempotency_records").fetchone()[0])
    schema = parse_qs(urlsplit(backend.url).query)["schema"][0]
    return await row_count(schema, "idempotency_records")
