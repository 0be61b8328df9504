"""The embedded job queue: one SQLite file, the default for a single sidecar.

Every state change is one transaction, so a crash leaves each job either before or
after a step, never half way. A take is a single UPDATE that claims one due row (or
one whose lease expired) with a lease owner, token and expiry; WAL lets readers run
beside it. sqlite3 blocks, so every call runs on a dedicated single-thread executor,
which also serialises access to the one connection. The connection and transaction
helpers are those of the other SQLite stores (`proxy.storage.sqlite`); unlike theirs,
the connection is opened at `open` and sqlite3 errors reach the caller as they are.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

from proxy.jobs.queue import Job, QueueUnavailable, WallClock
from proxy.storage.sqlite import DEFAULT_TIMEOUT, SqliteRunner

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    type        TEXT NOT NULL,
    body        TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'running', 'dead')),
    created_at  REAL NOT NULL,
    run_at      REAL NOT NULL,
    lease_owner TEXT,
    lease_token TEXT,
    lease_until REAL,
    dead_at     REAL
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (state, run_at);
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs (state, lease_until);
CREATE INDEX IF NOT EXISTS jobs_dead ON jobs (state, dead_at);
"""

# One statement, so claiming is atomic even with several processes on the file.
_TAKE = """
UPDATE jobs
SET lease_owner = :owner,
    lease_token = :token || CASE WHEN state = 'running' THEN ':r' ELSE '' END,
    state = 'running',
    lease_until = :now + :visibility
WHERE id = (
    SELECT id FROM jobs
    WHERE (state = 'pending' AND run_at <= :now)
       OR (state = 'running' AND lease_until <= :now)
    ORDER BY run_at, created_at
    LIMIT 1
)
RETURNING body, lease_token
"""


class SqliteQueue:
    """`JobQueue` over one SQLite database file; open it with `SqliteQueue.open`."""

    def __init__(
        self,
        path: str,
        *,
        name: str | None = None,
        wall: WallClock = time.time,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.name = name or f"sqlite://{path}"
        self.path = path
        self._wall = wall
        self._sqlite = SqliteRunner(
            path,
            _SCHEMA,
            name=self.name,
            unavailable=QueueUnavailable,
            timeout=timeout,
            synchronous="FULL",
            thread_name="jobs-sqlite",
        )

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        name: str | None = None,
        wall: WallClock = time.time,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> SqliteQueue:
        """Open (creating it and its directory if needed) the database at `path`."""
        queue = cls(path, name=name, wall=wall, timeout=timeout)
        try:
            if path != ":memory:":
                parent = Path(path).parent
                await asyncio.to_thread(parent.mkdir, parents=True, exist_ok=True)
            await queue._sqlite.open()
        except OSError as exc:
            await queue.close()
            raise QueueUnavailable(queue.name, f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            await queue.close()
            raise
        return queue

    async def _write(
        self, sql: str, params: dict[str, Any] | tuple[Any, ...], *, durable: bool = True
    ) -> int:
        """Run one write statement in its own immediate transaction; rows changed."""
        return await self._sqlite.transaction(
            lambda conn: conn.execute(sql, params).rowcount, durable=durable
        )

    async def enqueue(self, job: Job) -> bool:
        stored = job.stamped(self._wall())
        changed = await self._write(
            "INSERT OR IGNORE INTO jobs (id, type, body, state, created_at, run_at) "
            "VALUES (?, ?, ?, 'pending', ?, ?)",
            (stored.id, stored.type, stored.to_json(), stored.created_at, stored.run_at),
        )
        return changed == 1

    async def take(self, consumer: str, visibility_timeout: float) -> Job | None:
        params = {
            "owner": consumer,
            "token": f"{consumer}:{uuid.uuid4().hex}",
            "now": self._wall(),
            "visibility": visibility_timeout,
        }

        # not synced: a take lost in a power cut leaves the job pending, so it runs
        # later, as it would have had this worker died holding it
        row: tuple[str, str] | None = await self._sqlite.transaction(
            lambda conn: conn.execute(_TAKE, params).fetchone(), durable=False
        )
        if row is None:
            return None
        body, token = row
        # A take of a `running` row (its lease lapsed) marks the token with ':r'.
        return Job.from_json(body, receipt=token, redelivered=token.endswith(":r"))

    async def ack(self, job: Job) -> None:
        # not synced: an ack lost in a power cut runs the job again when its lease
        # lapses, which at-least-once delivery allows (handlers' calls carry keys)
        await self._write(
            "DELETE FROM jobs WHERE id = ? AND state = 'running' AND lease_token = ?",
            (job.id, job.receipt),
            durable=False,
        )

    async def retry(self, job: Job, error: str, run_at: float) -> None:
        failed = job.failed(error, run_at)
        await self._write(
            "UPDATE jobs SET state = 'pending', body = ?, run_at = ?, lease_owner = NULL, "
            "lease_token = NULL, lease_until = NULL "
            "WHERE id = ? AND state = 'running' AND lease_token = ?",
            (failed.to_json(), run_at, job.id, job.receipt),
        )

    async def bury(self, job: Job, error: str) -> None:
        failed = job.failed(error, job.run_at)
        await self._write(
            "UPDATE jobs SET state = 'dead', body = ?, dead_at = ?, lease_owner = NULL, "
            "lease_token = NULL, lease_until = NULL "
            "WHERE id = ? AND state = 'running' AND lease_token = ?",
            (failed.to_json(), self._wall(), job.id, job.receipt),
        )

    async def dead(self, limit: int = 100) -> list[Job]:
        rows = await self._sqlite.read(
            lambda conn: conn.execute(
                "SELECT body FROM jobs WHERE state = 'dead' ORDER BY dead_at, id LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [Job.from_json(body) for (body,) in rows]

    async def redrive(self, job_id: str) -> bool:
        now = self._wall()

        def redrive(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT body FROM jobs WHERE id = ? AND state = 'dead'", (job_id,)
            ).fetchone()
            if row is None:
                return False
            revived = Job.from_json(row[0]).revived(now)
            conn.execute(
                "UPDATE jobs SET state = 'pending', body = ?, run_at = ?, dead_at = NULL "
                "WHERE id = ?",
                (revived.to_json(), now, job_id),
            )
            return True

        return await self._sqlite.transaction(redrive)

    async def depth(self) -> int:
        (count,) = await self._sqlite.read(
            lambda conn: conn.execute("SELECT COUNT(*) FROM jobs WHERE state != 'dead'").fetchone()
        )
        return int(count)

    async def oldest_age(self) -> float | None:
        (oldest,) = await self._sqlite.read(
            lambda conn: conn.execute(
                "SELECT MIN(created_at) FROM jobs WHERE state != 'dead'"
            ).fetchone()
        )
        if oldest is None:
            return None
        return max(0.0, self._wall() - oldest)

    async def close(self) -> None:
        await self._sqlite.close()
