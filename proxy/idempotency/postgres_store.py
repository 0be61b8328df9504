"""`postgresql://user:pass@host:5432/db`: idempotency records shared by every replica.

A claim is one `INSERT ... ON CONFLICT DO UPDATE ... WHERE expires_at <= now`: it takes
a free key, or one whose record has expired, and changes nothing when a live record is
there. A concurrent claimer of the same key waits on the row's lock until the first
commits and then finds the key taken, so exactly one caller gets CLAIMED. The live
record is then read in the same transaction to answer IN_PROGRESS, COMPLETED or
MISMATCH. Expiry is by stored `expires_at` wall-clock timestamps, as in SQLite.

When the checkout journal is in the same database, the claim can carry the journal's
first record (`claim_joint`): both rows commit in one transaction or neither does.

Round trips: a claim sends the insert and the read together in one pipeline (one
implicit transaction; a read after a successful claim is simply ignored), one round
trip. A joint claim sends a claim that raises unless it took the key and the other
store's insert as one transaction (`PostgresDatabase.atomically`), one round trip; a
key that is taken rolls both back and the claim is made again the careful way.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from psycopg import AsyncCursor

from proxy.idempotency.store import (
    ClaimResult,
    ClaimState,
    StoredResponse,
    completed_record,
    result_for_existing,
)
from proxy.resilience.clock import Clock
from proxy.storage.joint import JointInsert
from proxy.storage.postgres import Conflict, Connection, PostgresDatabase, Statement
from proxy.storage.sweep import Sweep

_CLAIM = """
INSERT INTO {schema}.idempotency_records AS r (key, fingerprint, state, response, expires_at)
VALUES (%(key)s, %(fingerprint)s, 'in_progress', NULL, %(expires_at)s)
ON CONFLICT (key) DO UPDATE SET
    fingerprint = excluded.fingerprint, state = 'in_progress', response = NULL,
    expires_at = excluded.expires_at
WHERE r.expires_at <= %(now)s
"""

# The claim as a statement that fails (SQLSTATE `CONFLICT_SQLSTATE`) unless it took the key.
_CLAIM_OR_RAISE = f"""
WITH claimed AS ({_CLAIM.strip()}
RETURNING 1)
SELECT {{schema}}.expect_rows((SELECT count(*) FROM claimed))
"""

_FIND = """
SELECT fingerprint, state, response, expires_at FROM {schema}.idempotency_records
WHERE key = %s AND expires_at > %s
"""

_COMPLETE = """
INSERT INTO {schema}.idempotency_records AS r (key, fingerprint, state, response, expires_at)
VALUES (%s, %s, 'completed', %s, %s)
ON CONFLICT (key) DO UPDATE SET
    fingerprint = excluded.fingerprint, state = 'completed', response = excluded.response,
    expires_at = excluded.expires_at
"""

# Keep the table from growing forever: a bounded sweep with a completion (at most one
# per `SWEEP_EVERY`, `proxy.storage.sweep`); SKIP LOCKED so two sweeping replicas never
# wait on each other.
_PURGE = """
DELETE FROM {schema}.idempotency_records WHERE key IN (
    SELECT key FROM {schema}.idempotency_records WHERE expires_at <= %s
    LIMIT %s FOR UPDATE SKIP LOCKED
)
"""

_ABANDON = "DELETE FROM {schema}.idempotency_records WHERE key = %s AND state = 'in_progress'"

_PURGE_BATCH = 100
_CLAIM_ROUNDS = 3
"""A live record can vanish between the insert and the read (abandoned, or expiring at
that instant); the claim is then simply tried again, a few times at most."""


class PostgresStore:
    """Records in `<schema>.idempotency_records`; each operation is one short transaction."""

    def __init__(self, database: PostgresDatabase, *, clock: Clock = time.time) -> None:
        self.name = database.name
        self._db = database
        self._clock = clock
        self._claim_sql = database.sql(_CLAIM)
        self._claim_or_raise_sql = database.sql(_CLAIM_OR_RAISE)
        self._find_sql = database.sql(_FIND)
        self._complete_sql = database.sql(_COMPLETE)
        self._purge_sql = database.sql(_PURGE)
        self._sweep = Sweep()  # the expired records' purge, with some completions
        self._abandon_sql = database.sql(_ABANDON)

    def _claim_params(self, key: str, fingerprint: str, in_progress_ttl: float) -> dict[str, Any]:
        now = self._clock()
        return {
            "key": key,
            "fingerprint": fingerprint,
            "expires_at": now + in_progress_ttl,
            "now": now,
        }

    async def _send_claim(
        self, conn: Connection, params: dict[str, Any]
    ) -> tuple[AsyncCursor[tuple[Any, ...]], AsyncCursor[tuple[Any, ...]]]:
        """Queue the claim and the read of the live record (in pipeline mode, both go in
        one round trip); the read after a successful claim is ignored."""
        claim = await conn.execute(self._claim_sql, params)
        found = await conn.execute(self._find_sql, (params["key"], params["now"]))
        return claim, found

    async def _answer(
        self,
        claim: AsyncCursor[tuple[Any, ...]],
        found: AsyncCursor[tuple[Any, ...]],
        fingerprint: str,
        now: float,
    ) -> ClaimResult | None:
        """What the claim found; None if the live record vanished meanwhile."""
        row = await found.fetchone()
        if claim.rowcount == 1:
            return ClaimResult.claimed()
        if row is None:
            return None
        found_fingerprint, state, response, expires_at = row
        record: dict[str, Any] = {"state": state, "fingerprint": found_fingerprint}
        if response is not None:
            record["response"] = json.loads(response)
        return result_for_existing(record, fingerprint, expires_at - now)

    # -- the protocol --------------------------------------------------------------------

    async def claim(self, key: str, fingerprint: str, in_progress_ttl: float) -> ClaimResult:
        for _ in range(_CLAIM_ROUNDS):
            params = self._claim_params(key, fingerprint, in_progress_ttl)
            async with self._db.connection() as conn:
                async with conn.pipeline():  # one implicit transaction, one round trip
                    claim, found = await self._send_claim(conn, params)
                result = await self._answer(claim, found, fingerprint, params["now"])
            if result is not None:
                return result
        # the key kept changing under us: report it as busy, which is what it is
        return ClaimResult.in_progress(1.0)

    def joint_complete(
        self, key: str, fingerprint: str, response: StoredResponse, ttl: float
    ) -> tuple[JointInsert, ...]:
        body = json.dumps(completed_record(fingerprint, response)["response"])
        now = self._clock()
        database = self._db.database
        complete = JointInsert(database, self._complete_sql, (key, fingerprint, body, now + ttl))
        if not self._sweep.due(now):
            return (complete,)
        return (complete, JointInsert(database, self._purge_sql, (now, _PURGE_BATCH)))

    async def complete(
        self, key: str, fingerprint: str, response: StoredResponse, ttl: float
    ) -> None:
        joint = self.joint_complete(key, fingerprint, response, ttl)
        await self._db.atomically([(statement.sql, statement.params) for statement in joint])

    async def abandon(self, key: str) -> None:
        async with self._db.connection() as conn:
            await conn.execute(self._abandon_sql, (key,))

    async def close(self) -> None:
        await self._db.close()

    # -- a claim and another store's first row, in one transaction (JointClaims) ----------

    def accepts(self, insert: JointInsert) -> bool:
        return insert.database == self._db.database

    async def claim_joint(
        self, key: str, fingerprint: str, in_progress_ttl: float, insert: JointInsert
    ) -> ClaimResult:
        if not self.accepts(insert):
            raise ValueError(f"{insert.database} is not the database of {self.name}")
        try:
            params = self._claim_params(key, fingerprint, in_progress_ttl)
            statements: list[Statement] = [
                (self._claim_or_raise_sql, params),
                (insert.sql, insert.params),
            ]
            counts = await self._db.atomically(statements)
            return dataclasses.replace(ClaimResult.claimed(), joint=counts[-1] == 1)
        except Conflict:
            pass  # the key is taken (or just expired): nothing was written
        for _ in range(_CLAIM_ROUNDS):
            params = self._claim_params(key, fingerprint, in_progress_ttl)
            async with self._db.transaction() as conn:
                claim, found = await self._send_claim(conn, params)
                result = await self._answer(claim, found, fingerprint, params["now"])
                if result is None:
                    continue
                if result.state is not ClaimState.CLAIMED:
                    return result
                cursor = await conn.execute(insert.sql, insert.params)
                return dataclasses.replace(result, joint=cursor.rowcount == 1)
        return ClaimResult.in_progress(1.0)
