"""One SQLite file used from asyncio, as every SQLite-backed store uses it.

sqlite3 blocks, so a store's calls run on one dedicated thread that owns the
connection; the event loop never waits on the disk, and the single thread serialises
access to the connection. The file is in WAL mode, so readers run beside a writer, and
every change is a `BEGIN IMMEDIATE` transaction, which takes the write lock before the
first read, so two writers (tasks, threads or processes) never both edit the same old
version of a row.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

T = TypeVar("T")

Work = Callable[[sqlite3.Connection], T]
"""What runs on the store's thread: a function of the open connection."""

DEFAULT_TIMEOUT = 5.0
"""Seconds a statement waits for another writer's lock before failing."""


def timeout_from_url(url: str, default: float = DEFAULT_TIMEOUT) -> float:
    """A `sqlite://` URL's `?timeout=` in seconds."""
    values = parse_qs(urlsplit(url).query).get("timeout")
    return float(values[0]) if values else default


def connect(
    path: str,
    schema: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    synchronous: str = "NORMAL",
) -> sqlite3.Connection:
    """Open `path` in WAL mode in autocommit (transactions are explicit) and create `schema`.

    The connection may be used from another thread than the one that opened it, one at
    a time. `synchronous` is SQLite's: NORMAL survives a process crash, FULL power loss.
    """
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.executescript(schema)
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

    `transaction(work)` runs `work` in an immediate transaction on the thread. Any
    sqlite3 error (the file cannot be opened, the lock timed out, the disk failed)
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
        thread_name: str = "sqlite",
    ) -> None:
        self.path = path
        self.name = name
        self._schema = schema
        self._unavailable = unavailable
        self._timeout = timeout
        self._conn: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)

    async def transaction(self, work: Work[T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._in_transaction, work)
        except RuntimeError as exc:  # executor shut down: the store was closed
            raise self._unavailable(self.name, str(exc)) from exc

    async def close(self) -> None:
        """Close the connection and stop the thread; a second call does nothing."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(RuntimeError):  # already closed
            await loop.run_in_executor(self._executor, self._drop_connection)
        self._executor.shutdown(wait=False)

    # -- the thread side ---------------------------------------------------------------

    def _in_transaction(self, work: Work[T]) -> T:
        try:
            if self._conn is None:
                self._conn = connect(self.path, self._schema, timeout=self._timeout)
            return immediate(self._conn, work)
        except sqlite3.Error as exc:
            self._drop_connection()
            raise self._unavailable(self.name, f"{type(exc).__name__}: {exc}") from exc

    def _drop_connection(self) -> None:
        """Forget a connection that failed, so the next call starts clean."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
