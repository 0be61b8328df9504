"""`sqlite:///path`: idempotency records that survive a restart of a single sidecar.

The claim is one `INSERT ... ON CONFLICT DO NOTHING` inside a `BEGIN IMMEDIATE`
transaction, so it is atomic across tasks, threads and processes sharing the file.
Expiry is by stored `expires_at` wall-clock timestamps (monotonic time means
nothing after a restart). sqlite3 blocks, so every call runs on one dedicated
thread that owns the connection (`proxy.storage.sqlite.SqliteRunner`); the event
loop never waits on the disk.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from typing import Any

from proxy.idempotency.store import (
    ClaimResult,
    ClaimState,
    IdempotencyStoreUnavailable,
    StoredResponse,
    completed_record,
    result_for_existing,
)
from proxy.resilience.clock import Clock
from proxy.storage.joint import JointInsert
from proxy.storage.sqlite import DEFAULT_TIMEOUT, SqliteRunner
from proxy.storage.sweep import Sweep

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency_records (
    key         TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('in_progress', 'completed')),
    response    TEXT,
    expires_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_records_expires_at
    ON idempotency_records (expires_at);
"""

_PURGE_BATCH = 100

_COMPLETE = (
    "INSERT INTO idempotency_records (key, fingerprint, state, response, expires_at)"
    " VALUES (?, ?, 'completed', ?, ?) ON CONFLICT (key) DO UPDATE SET"
    " fingerprint = excluded.fingerprint, state = 'completed',"
    " response = excluded.response, expires_at = excluded.expires_at"
)
# Keep the file from growing forever: a bounded sweep on every write.
_PURGE = (
    "DELETE FROM idempotency_records WHERE rowid IN (SELECT rowid FROM"
    " idempotency_records WHERE expires_at <= ? LIMIT ?)"
)


class SqliteStore:
    """A WAL-mode SQLite file; each operation is one short transaction."""

    def __init__(
        self,
        path: str,
        *,
        name: str | None = None,
        clock: Clock = time.time,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.name = name or f"sqlite://{path}"
        self.path = path
        self._clock = clock
        self._sweep = Sweep()  # the expired records' purge, with some completions
        self._sqlite = SqliteRunner(
            path,
            _SCHEMA,
            name=self.name,
            unavailable=IdempotencyStoreUnavailable,
            timeout=timeout,
            thread_name="idempotency-sqlite",
        )

    # -- the protocol --------------------------------------------------------------

    def _claim(
        self, conn: sqlite3.Connection, key: str, fingerprint: str, in_progress_ttl: float
    ) -> ClaimResult:
        now = self._clock()
        conn.execute(
            "DELETE FROM idempotency_records WHERE key = ? AND expires_at <= ?", (key, now)
        )
        inserted = conn.execute(
            "INSERT INTO idempotency_records (key, fingerprint, state, response, expires_at)"
            " VALUES (?, ?, 'in_progress', NULL, ?) ON CONFLICT (key) DO NOTHING",
            (key, fingerprint, now + in_progress_ttl),
        )
        if inserted.rowcount == 1:
            return ClaimResult.claimed()
        found_fingerprint, state, response, expires_at = conn.execute(
            "SELECT fingerprint, state, response, expires_at FROM idempotency_records"
            " WHERE key = ?",
            (key,),
        ).fetchone()
        record: dict[str, Any] = {"state": state, "fingerprint": found_fingerprint}
        if response is not None:
            record["response"] = json.loads(response)
        return result_for_existing(record, fingerprint, expires_at - now)

    async def claim(self, key: str, fingerprint: str, in_progress_ttl: float) -> ClaimResult:
        return await self._sqlite.transaction(
            lambda conn: self._claim(conn, key, fingerprint, in_progress_ttl)
        )

    def joint_complete(
        self, key: str, fingerprint: str, response: StoredResponse, ttl: float
    ) -> tuple[JointInsert, ...]:
        body = json.dumps(completed_record(fingerprint, response)["response"])
        now = self._clock()
        database = self._sqlite.database
        complete = JointInsert(database, _COMPLETE, (key, fingerprint, body, now + ttl))
        if not self._sweep.due(now):
            return (complete,)
        return (complete, JointInsert(database, _PURGE, (now, _PURGE_BATCH)))

    async def complete(
        self, key: str, fingerprint: str, response: StoredResponse, ttl: float
    ) -> None:
        statements = self.joint_complete(key, fingerprint, response, ttl)

        def work(conn: sqlite3.Connection) -> None:
            for statement in statements:
                conn.execute(statement.sql, statement.params)

        await self._sqlite.transaction(work)

    # -- a claim and the journal's first row, in one transaction (JointClaims) ----------

    def accepts(self, insert: JointInsert) -> bool:
        """The insert goes to this file (the journal of `store: sqlite:///path`)."""
        return insert.database == self._sqlite.database

    async def claim_joint(
        self, key: str, fingerprint: str, in_progress_ttl: float, insert: JointInsert
    ) -> ClaimResult:
        if not self.accepts(insert):
            raise ValueError(f"{insert.database} is not the file of {self.name}")

        def work(conn: sqlite3.Connection) -> ClaimResult:
            result = self._claim(conn, key, fingerprint, in_progress_ttl)
            if result.state is not ClaimState.CLAIMED:
                return result
            inserted = conn.execute(insert.sql, insert.params).rowcount == 1
            return dataclasses.replace(result, joint=inserted)

        return await self._sqlite.transaction(work)

    async def abandon(self, key: str) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM idempotency_records WHERE key = ? AND state = 'in_progress'", (key,)
            )

        await self._sqlite.transaction(work)

    async def close(self) -> None:
        await self._sqlite.close()
