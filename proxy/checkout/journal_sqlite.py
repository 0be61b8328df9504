"""`sqlite:///path`: the checkout journal of a single sidecar, surviving its restarts.

One row per checkout with the record as JSON. Every read-modify-write runs inside a
`BEGIN IMMEDIATE` transaction, which takes the file's write lock before the read, so
two writers (tasks, threads or processes) can never both edit the same old version.
sqlite3 blocks, so every call runs on one dedicated thread that owns the connection
(`proxy.storage.sqlite.SqliteRunner`, as in the idempotency store); after an error the
connection is dropped and the next call reconnects. The file may be the one the
idempotency store and job queue use.

`expires_at` is NULL while a checkout is unfinished (a crash must stay recoverable)
and set to now + ttl when it becomes final; expired rows are invisible at once and
deleted a batch at a time whenever a record becomes final.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from proxy import jsoncodec
from proxy.checkout.journal import (
    DEFAULT_TTL,
    FINAL,
    STATES,
    Change,
    CheckoutRecord,
    Cursor,
    EditingJournal,
    EventsIf,
    JournalUnavailable,
    OutboxEvent,
    WallClock,
    new_record_data,
)
from proxy.storage.joint import JointInsert
from proxy.storage.sqlite import DEFAULT_TIMEOUT, SqliteRunner
from proxy.storage.sweep import Sweep

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkout_journal (
    id          TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL,
    record      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkout_journal_state_created_at
    ON checkout_journal (state, created_at);
CREATE INDEX IF NOT EXISTS checkout_journal_expires_at
    ON checkout_journal (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS checkout_outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    checkout_id  TEXT NOT NULL,
    type         TEXT NOT NULL,
    body         TEXT NOT NULL
);
"""
# The outbox: events not yet confirmed by the broker, in write order (`seq`). A row is
# inserted by the same transaction as the record change that caused it, and deleted
# when the broker confirms it.

_NOT_FINAL = tuple(state for state in STATES if state != FINAL)
# `state IN (...)` rather than `state <> 'final'`, so the (state, created_at) index is used.
_UNFINISHED = (
    "SELECT record FROM checkout_journal"
    f" WHERE state IN ({', '.join('?' for _ in _NOT_FINAL)}) AND created_at <= ?"
    " AND (created_at > ? OR (created_at = ? AND id > ?))"
    " ORDER BY created_at, id LIMIT ?"
)
_LIVE = "(expires_at IS NULL OR expires_at > ?)"
# A new record, or one replacing an expired final record of the same id: one row changed;
# none when a live record has the id.
_CREATE = (
    "INSERT INTO checkout_journal (id, state, created_at, expires_at, record)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET state = excluded.state,"
    " created_at = excluded.created_at, expires_at = excluded.expires_at,"
    " record = excluded.record"
    " WHERE checkout_journal.expires_at IS NOT NULL AND checkout_journal.expires_at <= ?"
)
_PURGE_BATCH = 100


class SqliteJournal(EditingJournal):
    """A WAL-mode SQLite file; each operation is one short transaction."""

    def __init__(
        self,
        path: str,
        *,
        name: str | None = None,
        ttl: float = DEFAULT_TTL,
        wall: WallClock = time.time,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.name = name or f"sqlite://{path}"
        self.path = path
        self.ttl = ttl
        self._wall = wall
        self._sweep = Sweep()  # the expired records' purge, with some final writes
        self._sqlite = SqliteRunner(
            path,
            _SCHEMA,
            name=self.name,
            unavailable=JournalUnavailable,
            timeout=timeout,
            thread_name="journal-sqlite",
        )

    # -- one record inside a transaction ---------------------------------------------------

    def _load(self, conn: sqlite3.Connection, checkout_id: str, now: float) -> dict[str, Any]:
        row = conn.execute(
            f"SELECT record FROM checkout_journal WHERE id = ? AND {_LIVE}", (checkout_id, now)
        ).fetchone()
        if row is None:
            raise KeyError(checkout_id)
        return jsoncodec.loads(row[0])

    def _store(
        self, conn: sqlite3.Connection, data: dict[str, Any], was_final: bool, now: float
    ) -> None:
        """Write the record back; a record that just became final starts its ttl."""
        final = data["state"] == FINAL
        record = jsoncodec.dumps(data)
        if final and was_final:  # keep the expiry it got when it became final
            conn.execute(
                "UPDATE checkout_journal SET state = ?, record = ? WHERE id = ?",
                (data["state"], record, data["id"]),
            )
            return
        conn.execute(
            "UPDATE checkout_journal SET state = ?, record = ?, expires_at = ? WHERE id = ?",
            (data["state"], record, now + self.ttl if final else None, data["id"]),
        )
        if final and self._sweep.due(now):
            self._purge(conn, now)

    @staticmethod
    def _purge(conn: sqlite3.Connection, now: float) -> None:
        """Delete a bounded batch of expired records, so the file does not grow forever."""
        conn.execute(
            "DELETE FROM checkout_journal WHERE rowid IN (SELECT rowid FROM checkout_journal"
            " WHERE expires_at <= ? LIMIT ?)",
            (now, _PURGE_BATCH),
        )

    @staticmethod
    def _write_events(conn: sqlite3.Connection, events: Sequence[OutboxEvent]) -> None:
        conn.executemany(
            "INSERT INTO checkout_outbox (id, checkout_id, type, body) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (id) DO NOTHING",
            [(e.id, e.checkout_id, e.type, jsoncodec.dumps(e.body)) for e in events],
        )

    async def _change(
        self,
        checkout_id: str,
        change: Change[T],
        events: EventsIf | None = None,
        also: Sequence[JointInsert] = (),
    ) -> T:
        """One transaction that loads the record, applies `change`, stores it and
        writes the change's outbox events and the statements `also`."""
        for statement in also:
            if not self.accepts(statement):
                raise ValueError(f"{statement.database} is not the file of {self.name}")

        def work(conn: sqlite3.Connection) -> T:
            now = self._wall()
            data = self._load(conn, checkout_id, now)
            was_final = data["state"] == FINAL
            result = change(data, now)
            self._store(conn, data, was_final, now)
            if events is not None:
                self._write_events(conn, events(result))
            for statement in also:
                conn.execute(statement.sql, statement.params)
            return result

        return await self._sqlite.transaction(work)

    async def unsent_events(self, limit: int = 100) -> list[OutboxEvent]:
        def work(conn: sqlite3.Connection) -> list[OutboxEvent]:
            rows = conn.execute(
                "SELECT id, checkout_id, type, body FROM checkout_outbox ORDER BY seq LIMIT ?",
                (max(limit, 0),),
            ).fetchall()
            return [OutboxEvent(row[0], row[1], row[2], jsoncodec.loads(row[3])) for row in rows]

        return await self._sqlite.transaction(work)

    async def mark_events_sent(self, ids: Iterable[str]) -> None:
        sent = [(event_id,) for event_id in ids]
        if not sent:
            return

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM checkout_outbox WHERE id = ?", sent)

        await self._sqlite.transaction(work)

    async def outbox_pending(self) -> int:
        def work(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT count(*) FROM checkout_outbox").fetchone()[0])

        return await self._sqlite.transaction(work)

    # -- the protocol ------------------------------------------------------------------

    def _create_params(self, record: CheckoutRecord) -> tuple[Any, ...]:
        now = self._wall()
        data = new_record_data(record, now)
        final = data["state"] == FINAL
        return (
            data["id"],
            data["state"],
            data["created_at"],
            now + self.ttl if final else None,
            jsoncodec.dumps(data),
            now,
        )

    async def create(self, record: CheckoutRecord) -> bool:
        params = self._create_params(record)
        return await self._sqlite.transaction(
            lambda conn: conn.execute(_CREATE, params).rowcount == 1
        )

    def joint_create(self, record: CheckoutRecord) -> JointInsert:
        """`create` as a statement for the idempotency store's claim transaction."""
        return JointInsert(self._sqlite.database, _CREATE, self._create_params(record))

    def accepts(self, insert: JointInsert) -> bool:
        return insert.database == self._sqlite.database

    async def get(self, checkout_id: str) -> CheckoutRecord | None:
        def work(conn: sqlite3.Connection) -> CheckoutRecord | None:
            try:
                return CheckoutRecord.from_dict(self._load(conn, checkout_id, self._wall()))
            except KeyError:
                return None

        return await self._sqlite.read(work)

    async def unfinished(
        self, older_than: float, limit: int = 100, after: Cursor | None = None
    ) -> list[CheckoutRecord]:
        if limit <= 0:
            return []
        since, last_id = after if after is not None else (float("-inf"), "")

        def work(conn: sqlite3.Connection) -> list[CheckoutRecord]:
            cutoff = self._wall() - older_than
            rows = conn.execute(
                _UNFINISHED, (*_NOT_FINAL, cutoff, since, since, last_id, limit)
            ).fetchall()
            return [CheckoutRecord.from_dict(jsoncodec.loads(row[0])) for row in rows]

        return await self._sqlite.transaction(work)

    async def close(self) -> None:
        await self._sqlite.close()
