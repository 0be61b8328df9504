"""One SQLite file used from asyncio, as every SQLite-backed store uses it.

sqlite3 blocks, so a store's calls run on one dedicated thread that owns the
connection; the event loop never waits on the disk, and the single thread serialises
access to the connection. The file is in WAL mode, so readers run beside a writer, and
every change is a `BEGIN IMMEDIATE` transaction, which takes the write lock before the
first read, so two writers (tasks, threads or processes) never both edit the same old
version of a row.

Several processes (a sidecar and its `worker`, or the three stores of one sidecar) may
open the same new file at once. Switching it to WAL can fail with "database is locked"
without SQLite's busy handler ever waiting, so `connect` retries that step, and the
schema creation, with a short backoff until its timeout runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

T = TypeVar("T")

Work = Callable[[sqlite3.Connection], T]
"""What runs on the store's thread: a function of the open connection."""

Synchronous = Literal["NORMAL", "FULL"]
"""SQLite's `synchronous`: NORMAL survives a process crash, FULL also power loss."""

DEFAULT_TIMEOUT = 5.0
"""Seconds a statement waits for another writer's lock before failing."""


_FIRST_BACKOFF = 0.005
_MAX_BACKOFF = 0.1


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "database is locked" in text or "database is busy" in text


def _while_busy(step: Callable[[], T], timeout: float) -> T:
    """Run `step`, again after a short jittered pause each time the file is busy,
    until it succeeds or `timeout` seconds have passed (then the last error is raised)."""
    deadline = time.monotonic() + timeout
    pause = _FIRST_BACKOFF
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            left = deadline - time.monotonic()
            if not _is_busy(exc) or left <= 0:
                raise
            time.sleep(min(left, random.uniform(pause / 2, pause)))
            pause = min(pause * 2, _MAX_BACKOFF)


def _use_wal(conn: sqlite3.Connection) -> None:
    (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
    if str(mode).lower() not in ("wal", "memory"):  # ":memory:" databases have no WAL
        raise sqlite3.OperationalError(f"database is locked (journal_mode stayed {mode})")


def _create_schema(conn: sqlite3.Connection, schema: str) -> None:
    """The schema in one write transaction, so openers racing on a new file take turns."""
    try:
        conn.executescript(f"BEGIN IMMEDIATE;\n{schema}\nCOMMIT;")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def connect(
    path: str,
    schema: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    synchronous: Synchronous = "NORMAL",
) -> sqlite3.Connection:
    """Open `path` in WAL mode in autocommit (transactions are explicit) and create `schema`.

    The connection may be used from another thread than the one that opened it, one at
    a time. A file that other connections are opening (or writing) at the same moment is
    waited for, up to `timeout` seconds, never reported as locked straight away.
    """
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    try:
        # Before any other statement, so every statement below waits for a lock.
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        _while_busy(lambda: _use_wal(conn), timeout)
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        _while_busy(lambda: _create_schema(conn, schema), timeout)
    except BaseException:
        conn.close()
        raise
    return conn


def immediate(conn: sqlite3.Connection, work: Work[T]) -> T:
    """Run `work` in one `BEGIN IMMEDIATE` transaction: committed if it returns, rolled
    back if it (or the commit) raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


class SqliteRunner:
    """A store's SQLite file: one worker thread, one connection opened on first use.

    `transaction(work)` runs `work` in an immediate transaction on the thread; `read(work)`
    runs a read-only `work` without one (each statement sees one consistent snapshot).
    Any sqlite3 error (the file cannot be opened, the lock timed out, the disk failed)
    drops the connection, so the next call starts clean, and is raised as
    `unavailable(name, detail)`, the store's own error; so is a call after `close()`.
    """

    def __init__(
        self,
        path: str,
        schema: str,
        *,
        name: str,
        unavailable: Callable[[str, str], Exception],
        timeout: float = DEFAULT_TIMEOUT,
        synchronous: Synchronous = "NORMAL",
        thread_name: str = "sqlite",
    ) -> None:
        self.path = path
        self.name = name
        self._schema = schema
        self._unavailable = unavailable
        self._timeout = timeout
        self._synchronous: Synchronous = synchronous
        self._conn: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)

    async def open(self) -> None:
        """Open the file and create the schema now rather than at the first call."""
        await self._on_thread(lambda conn: None)

    async def transaction(self, work: Work[T]) -> T:
        return await self._on_thread(lambda conn: immediate(conn, work))

    async def read(self, work: Work[T]) -> T:
        return await self._on_thread(work)

    async def close(self) -> None:
        """Close the connection and stop the thread; a second call does nothing."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(RuntimeError):  # already closed
            await loop.run_in_executor(self._executor, self._drop_connection)
        self._executor.shutdown(wait=False)

    async def _on_thread(self, work: Work[T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._run, work)
        except RuntimeError as exc:  # executor shut down: the store was closed
            raise self._unavailable(self.name, str(exc)) from exc

    # -- the thread side ---------------------------------------------------------------

    def _run(self, work: Work[T]) -> T:
        try:
            if self._conn is None:
                self._conn = connect(
                    self.path, self._schema, timeout=self._timeout, synchronous=self._synchronous
                )
            return work(self._conn)
        except sqlite3.Error as exc:
            self._drop_connection()
            raise self._unavailable(self.name, f"{type(exc).__name__}: {exc}") from exc

    def _drop_connection(self) -> None:
        """Forget a connection that failed, so the next call starts clean."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
