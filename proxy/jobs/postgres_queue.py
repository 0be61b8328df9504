"""`postgresql://user:pass@host:5432/db`: the job queue shared by every replica.

Jobs are rows of `<schema>.jobs`. A take is one UPDATE whose subquery picks the oldest
due row (pending and `run_at` passed, or running with its lease expired) `FOR UPDATE
SKIP LOCKED`: concurrent takers on any replica skip rows another taker is claiming
instead of queueing behind it, so each job goes to one taker and none waits. The lease
(owner, token, `lease_until`) is the visibility timeout; `ack`, `retry` and `bury` only
act while the caller's token still holds the lease, so a worker that lost its lease
changes nothing. Dead jobs stay in the table (`state = 'dead'`) until redriven. A take and an ack
commit without waiting for the WAL's flush (`synchronous_commit` off for their
transaction only): one lost in a server crash runs its job again, which at-least-once
delivery allows, and enqueues, retries and burials stay durable.

Enqueue and redrive send `NOTIFY` on the queue's channel in the same transaction
(delivered at commit), and `wait_for_work` waits for it on a LISTEN connection of its
own, so an idle `Worker` takes a new job at once rather than at its next poll; polling
stays as the fallback, for delayed retries and when the LISTEN connection is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import psycopg

from proxy.jobs.queue import Job, QueueUnavailable, WallClock
from proxy.storage.postgres import Connection, PostgresDatabase

# One statement, so one round trip in autocommit: the insert, and the notification
# (sent at commit) only when it inserted a row.
_ENQUEUE = """
WITH added AS (
    INSERT INTO {schema}.jobs (id, type, body, state, created_at, run_at)
    VALUES (%s, %s, %s::jsonb, 'pending', %s, %s)
    ON CONFLICT (id) DO NOTHING
    RETURNING 1
)
SELECT pg_notify(%s, '') FROM added
"""

_TAKE = """
UPDATE {schema}.jobs
SET lease_owner = %(owner)s,
    lease_token = %(token)s::text || CASE WHEN state = 'running' THEN ':r' ELSE '' END,
    state = 'running',
    lease_until = %(now)s + %(visibility)s
WHERE id = (
    SELECT id FROM {schema}.jobs
    WHERE (state = 'pending' AND run_at <= %(now)s)
       OR (state = 'running' AND lease_until <= %(now)s)
    ORDER BY run_at, created_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING body::text, lease_token
"""

_ACK = "DELETE FROM {schema}.jobs WHERE id = %s AND state = 'running' AND lease_token = %s"
_RETRY = """
UPDATE {schema}.jobs SET state = 'pending', body = %s::jsonb, run_at = %s,
    lease_owner = NULL, lease_token = NULL, lease_until = NULL
WHERE id = %s AND state = 'running' AND lease_token = %s
"""
_BURY = """
UPDATE {schema}.jobs SET state = 'dead', body = %s::jsonb, dead_at = %s,
    lease_owner = NULL, lease_token = NULL, lease_until = NULL
WHERE id = %s AND state = 'running' AND lease_token = %s
"""
_DEAD = """
SELECT body::text FROM {schema}.jobs WHERE state = 'dead' ORDER BY dead_at, id LIMIT %s
"""
_FIND_DEAD = "SELECT body::text FROM {schema}.jobs WHERE id = %s AND state = 'dead' FOR UPDATE"
_REDRIVE = """
UPDATE {schema}.jobs SET state = 'pending', body = %s::jsonb, run_at = %s, dead_at = NULL
WHERE id = %s
"""
_DEPTH = "SELECT count(*), min(created_at) FROM {schema}.jobs WHERE state <> 'dead'"


class PostgresQueue:
    """`JobQueue` over `<schema>.jobs`; open it with `PostgresQueue.open`."""

    def __init__(self, database: PostgresDatabase, *, wall: WallClock = time.time) -> None:
        self.name = database.name
        self._db = database
        self._wall = wall
        self.channel = f"{database.schema_name[:58]}_jobs"  # names end at 63 bytes
        """The NOTIFY channel: one per schema, so queues in other schemas stay quiet."""
        self._listen_sql = f'LISTEN "{self.channel}"'
        self._sql = {
            name: database.sql(text)
            for name, text in {
                "enqueue": _ENQUEUE,
                "take": _TAKE,
                "ack": _ACK,
                "retry": _RETRY,
                "bury": _BURY,
                "dead": _DEAD,
                "find_dead": _FIND_DEAD,
                "redrive": _REDRIVE,
                "depth": _DEPTH,
            }.items()
        }
        self._listener: Connection | None = None

    @classmethod
    async def open(
        cls, database: PostgresDatabase, *, wall: WallClock = time.time
    ) -> PostgresQueue:
        """The queue, its schema migrated now (a failure raises `QueueUnavailable`)."""
        queue = cls(database, wall=wall)
        try:
            await database.open()
        except BaseException:
            await queue.close()
            raise
        return queue

    async def _notify(self, conn: Connection) -> None:
        await conn.execute("SELECT pg_notify(%s, '')", (self.channel,))

    async def _write(self, name: str, params: tuple[Any, ...]) -> int:
        async with self._db.connection() as conn:
            cursor = await conn.execute(self._sql[name], params)
            return cursor.rowcount

    # -- the protocol ------------------------------------------------------------------

    async def enqueue(self, job: Job) -> bool:
        stored = job.stamped(self._wall())
        params = (
            stored.id,
            stored.type,
            stored.to_json(),
            stored.created_at,
            stored.run_at,
            self.channel,
        )
        async with self._db.connection() as conn:
            cursor = await conn.execute(self._sql["enqueue"], params)
            return cursor.rowcount == 1

    async def take(self, consumer: str, visibility_timeout: float) -> Job | None:
        params = {
            "owner": consumer,
            "token": f"{consumer}:{uuid.uuid4().hex}",
            "now": self._wall(),
            "visibility": visibility_timeout,
        }
        _, row = await self._db.unsynced(self._sql["take"], params)
        if row is None:
            return None
        body, token = row
        # A take of a `running` row (its lease lapsed) marks the token with ':r'.
        return Job.from_json(body, receipt=token, redelivered=token.endswith(":r"))

    async def ack(self, job: Job) -> None:
        await self._db.unsynced(self._sql["ack"], (job.id, job.receipt))

    async def retry(self, job: Job, error: str, run_at: float) -> None:
        failed = job.failed(error, run_at)
        await self._write("retry", (failed.to_json(), run_at, job.id, job.receipt))

    async def bury(self, job: Job, error: str) -> None:
        failed = job.failed(error, job.run_at)
        await self._write("bury", (failed.to_json(), self._wall(), job.id, job.receipt))

    async def dead(self, limit: int = 100) -> list[Job]:
        async with self._db.connection() as conn:
            cursor = await conn.execute(self._sql["dead"], (limit,))
            rows = await cursor.fetchall()
        return [Job.from_json(body) for (body,) in rows]

    async def redrive(self, job_id: str) -> bool:
        now = self._wall()
        async with self._db.transaction() as conn:
            cursor = await conn.execute(self._sql["find_dead"], (job_id,))
            row = await cursor.fetchone()
            if row is None:
                return False
            revived = Job.from_json(row[0]).revived(now)
            await conn.execute(self._sql["redrive"], (revived.to_json(), now, job_id))
            await self._notify(conn)
            return True

    async def depth(self) -> int:
        count, _ = await self._owed()
        return count

    async def oldest_age(self) -> float | None:
        _, oldest = await self._owed()
        if oldest is None:
            return None
        return max(0.0, self._wall() - oldest)

    async def _owed(self) -> tuple[int, float | None]:
        async with self._db.connection() as conn:
            cursor = await conn.execute(self._sql["depth"])
            row = await cursor.fetchone()
        assert row is not None  # an aggregate always answers
        count, oldest = row
        return int(count), None if oldest is None else float(oldest)

    # -- waking idle workers (WakesWorkers) -----------------------------------------------

    async def wait_for_work(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for an enqueue anywhere; True if one came.

        The LISTEN connection is opened on first use and kept; when it cannot be
        opened or breaks, this sleeps out `timeout` (the worker then polls as usual)
        and tries a new connection next time.
        """
        try:
            listener = await self._listening()
            async for _ in listener.notifies(timeout=timeout, stop_after=1):
                return True
            return False
        except asyncio.CancelledError:
            await self._drop_listener()  # a notifies() cut short leaves it mid-read
            raise
        except (psycopg.Error, OSError, QueueUnavailable):
            await self._drop_listener()
            await asyncio.sleep(timeout)
            return False

    async def _listening(self) -> Connection:
        if self._listener is None or self._listener.closed:
            listener = await self._db.listener()
            try:
                await listener.execute(self._listen_sql)
            except BaseException:
                await listener.close()
                raise
            self._listener = listener
        return self._listener

    async def _drop_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await listener.close()

    async def close(self) -> None:
        await self._drop_listener()
        await self._db.close()
