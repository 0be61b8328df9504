"""`postgresql://user:pass@host:5432/db`: the job queue shared by every replica.

Jobs are rows of `<schema>.jobs`. A take is one UPDATE whose subquery picks the oldest
due rows, as many as the worker has free slots (pending and `run_at` passed, or running
with its lease expired) `FOR UPDATE SKIP LOCKED`: concurrent takers on any replica skip
rows another taker is claiming instead of queueing behind it, so each job goes to one
taker and none waits. The lease (owner, token, `lease_until`) is the visibility
timeout; `ack`, `retry` and `bury` only act while the caller's token still holds the
lease, so a worker that lost its lease changes nothing. Dead jobs stay in the table
(`state = 'dead'`) until redriven. A take and an ack commit without waiting for the
WAL's flush (`synchronous_commit` off for their transaction only): one lost in a
server crash runs its job again, which at-least-once delivery allows, and enqueues,
retries and burials stay durable.

Enqueue and redrive send `NOTIFY` on the queue's channel in the same transaction
(delivered at commit), and `wait_for_work` waits for it on a LISTEN connection of its
own, so an idle `Worker` takes a new job at once rather than at its next poll. A take
that finds nothing answers when the queue next owes work (the earliest delayed
`run_at` or running `lease_until`), and the wait ends then too: delayed jobs, retries
and lapsed leases are taken when due without polling (a retry notifies too, so every
idle worker learns its `run_at`). The worker's safety poll (5 s) remains for a wake-up
that got lost.
Before, an idle worker took every 200 ms, about 0.7 ms of server time each: most of
the queue's takes per checkout at low load.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg

from proxy.jobs.queue import Job, QueueUnavailable, WallClock
from proxy.storage.postgres import Connection, PostgresDatabase

# One or several jobs in one statement, so one round trip in autocommit: one commit and,
# when any row was new, one NOTIFY (sent at commit).
_ENQUEUE_MANY = """
WITH added AS (
    INSERT INTO {schema}.jobs (id, type, body, state, created_at, run_at)
    VALUES {rows}
    ON CONFLICT (id) DO NOTHING
    RETURNING 1
), counted AS (SELECT count(*) AS n FROM added)
SELECT n, CASE WHEN n > 0 THEN pg_notify(%s, '') END FROM counted
"""
_ENQUEUE_ROW = "(%s, %s, %s::jsonb, 'pending', %s, %s)"

# The take (of `limit` jobs at most), and when the queue next owes work besides the
# jobs taken: the earliest `run_at` of a pending job or `lease_until` of a running one.
# An idle worker sleeps until then (or a NOTIFY) instead of polling, and after a take
# it takes again only when another job is due already; both minima are read off the
# partial indexes `jobs_due` and `jobs_lease`, in the same round trip. The statement turns off
# `synchronous_commit` for its own (implicit) transaction with `set_config(..., true)`,
# which lets it run alone, server-side bound and prepared: unprepared, planning this
# statement cost more than running it (0.65 ms a take, against 0.22 prepared).
_TAKE = """
WITH taken AS (
    UPDATE {schema}.jobs
    SET lease_owner = %(owner)s,
        lease_token = %(token)s::text || CASE WHEN state = 'running' THEN ':r' ELSE '' END,
        state = 'running',
        lease_until = %(now)s + %(visibility)s
    WHERE id IN (
        SELECT id FROM {schema}.jobs
        WHERE (state = 'pending' AND run_at <= %(now)s)
           OR (state = 'running' AND lease_until <= %(now)s)
        ORDER BY run_at, created_at
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    )
    RETURNING id, body::text, lease_token, run_at, created_at
)
SELECT taken.body, taken.lease_token, owed.next_due
FROM (SELECT set_config('synchronous_commit', 'off', true)) AS unsynced,
(SELECT least(
    (SELECT min(run_at) FROM {schema}.jobs
     WHERE state = 'pending' AND id NOT IN (SELECT id FROM taken)),
    (SELECT min(lease_until) FROM {schema}.jobs
     WHERE state = 'running' AND id NOT IN (SELECT id FROM taken))
) AS next_due) AS owed
LEFT JOIN taken ON true
ORDER BY taken.run_at, taken.created_at
"""

# Unsynced like the take, and for the same reason one statement, prepared: the
# `SET LOCAL` in front of it made the ack a two-statement simple query, planned anew
# every time. A job whose ack a server crash loses runs again, which it may.
_ACK = """
DELETE FROM {schema}.jobs
USING (SELECT set_config('synchronous_commit', 'off', true)) AS unsynced
WHERE id = %s AND state = 'running' AND lease_token = %s
"""
# Notifies too, though the job is not due yet: an idle worker (this replica's, which
# is waiting on a NOTIFY or a due time it learned before this retry, or another's)
# takes once, learns the new `run_at` from the empty take and sleeps until then.
_RETRY = """
WITH retried AS (
    UPDATE {schema}.jobs SET state = 'pending', body = %s::jsonb, run_at = %s,
        lease_owner = NULL, lease_token = NULL, lease_until = NULL
    WHERE id = %s AND state = 'running' AND lease_token = %s
    RETURNING 1
)
SELECT pg_notify(%s, '') FROM retried
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

_RECHECK_LOCKED = 0.02
"""Seconds before looking again at a job that was due but locked by another taker."""


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
        self._many: dict[int, str] = {}  # enqueue_many's statement per number of jobs
        self._listener: Connection | None = None
        self._next_due: float | None = None
        """Wall time at which a job this queue knows of may next be taken, or None when
        it knows of none, as of the last `take`: `wait_for_work` sleeps no longer
        than until then. Whatever changes it later (an enqueue, a retry, a redrive)
        sends a NOTIFY, which ends the wait, and the take that follows reads it anew."""
        self._more_due = False
        """The last take took a job and left another one due: take again at once."""

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
        return await self.enqueue_many([job]) == 1

    async def enqueue_many(self, jobs: Sequence[Job]) -> int:
        if not jobs:
            return 0
        params: list[Any] = []
        for job in jobs:
            stored = job.stamped(self._wall())
            params += (stored.id, stored.type, stored.to_json(), stored.created_at, stored.run_at)
        params.append(self.channel)
        async with self._db.connection() as conn:
            cursor = await conn.execute(self._enqueue_many_sql(len(jobs)), params)
            row = await cursor.fetchone()
        assert row is not None  # the count is always answered
        return int(row[0])

    def _enqueue_many_sql(self, count: int) -> str:
        sql = self._many.get(count)
        if sql is None:
            rows = ", ".join([_ENQUEUE_ROW] * count)
            sql = self._many[count] = self._db.sql(_ENQUEUE_MANY.replace("{rows}", rows))
        return sql

    async def take(self, consumer: str, visibility_timeout: float) -> Job | None:
        jobs = await self.take_many(consumer, visibility_timeout, 1)
        return jobs[0] if jobs else None

    async def take_many(self, consumer: str, visibility_timeout: float, limit: int) -> list[Job]:
        """`TakesMany`: one statement leases up to `limit` jobs under one token."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        params = {
            "owner": consumer,
            "token": f"{consumer}:{uuid.uuid4().hex}",
            "now": self._wall(),
            "visibility": visibility_timeout,
            "limit": limit,
        }
        async with self._db.connection() as conn:
            cursor = await conn.execute(self._sql["take"], params, prepare=True)
            rows = await cursor.fetchall()
        # every row answers the next due time; a take of nothing answers one row for it
        next_due = rows[0][2]
        self._next_due = None if next_due is None else float(next_due)
        taken = [(body, token) for body, token, _ in rows if body is not None]
        self._more_due = bool(taken) and next_due is not None and next_due <= params["now"]
        # A take of a `running` row (its lease lapsed) marks the token with ':r'.
        return [
            Job.from_json(body, receipt=token, redelivered=token.endswith(":r"))
            for body, token in taken
        ]

    async def ack(self, job: Job) -> None:
        async with self._db.connection() as conn:
            await conn.execute(self._sql["ack"], (job.id, job.receipt), prepare=True)

    async def retry(self, job: Job, error: str, run_at: float) -> None:
        failed = job.failed(error, run_at)
        await self._write("retry", (failed.to_json(), run_at, job.id, job.receipt, self.channel))

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
        """Wait up to `timeout` seconds for an enqueue anywhere or for a known job to
        fall due (a delayed or retried job's `run_at`, a lapsed lease); True when the
        worker should take again at once.

        The earliest due time comes from the last `take`, and every change to it is
        announced, so an idle worker never polls; `timeout` is only the safety net
        (clocks that disagree, a server that lost a notification). The LISTEN
        connection is opened on first use and kept; a new one answers True at once,
        since a job enqueued before it listened was not announced to it. When it cannot
        be opened or breaks, this sleeps out the wait (the worker then polls as usual)
        and tries a new connection next time.
        """
        if self._more_due:
            self._more_due = False
            return True
        wait = self._wait_before_due(timeout)
        try:
            listener, fresh = await self._listening()
            if fresh:
                return True
            async for _ in listener.notifies(timeout=wait, stop_after=1):
                return True
            return wait < timeout
        except asyncio.CancelledError:
            await self._drop_listener()  # a notifies() cut short leaves it mid-read
            raise
        except (psycopg.Error, OSError, QueueUnavailable):
            await self._drop_listener()
            await asyncio.sleep(wait)
            return False

    def _wait_before_due(self, timeout: float) -> float:
        """Seconds to wait: `timeout`, or less when a known job falls due sooner. A job
        due already was skipped by the last take because another taker held its row;
        that taker commits within moments, so look again shortly rather than at once."""
        if self._next_due is None:
            return timeout
        return min(timeout, max(self._next_due - self._wall(), _RECHECK_LOCKED))

    async def _listening(self) -> tuple[Connection, bool]:
        """The LISTEN connection, and whether it was opened just now."""
        if self._listener is not None and not self._listener.closed:
            return self._listener, False
        listener = await self._db.listener()
        try:
            await listener.execute(self._listen_sql)
        except BaseException:
            await listener.close()
            raise
        self._listener = listener
        return listener, True

    async def _drop_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await listener.close()

    async def close(self) -> None:
        await self._drop_listener()
        await self._db.close()
