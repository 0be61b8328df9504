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

One file, one thread, one connection per process. The idempotency store, the journal
and the job queue of a sidecar usually share one file (`store: sqlite:///path`). Each
with a connection of its own, they took the file's one write lock in turn, and a
writer that found it taken slept in SQLite's busy handler (1, 2, 5, 10 ms ...): a
checkout's few writes paid milliseconds each while the queue's workers polled. So the
runners of one file in one process share a `_SharedFile`: one thread, one connection,
each store's schema created on it once. Their transactions run one after the other on
that thread without ever waiting for a lock held in the same process (other processes,
such as a `checkout-sidecar worker`, still meet the busy handler). Each runner keeps its
own `synchronous` level: it is set on the connection before its transaction when it
differs (a PRAGMA, no I/O).

Durability: WAL, and `synchronous` as each store asks. The idempotency records and the
journal use NORMAL: a commit is in the WAL (the OS's page cache) when it returns, so it
survives a crash or SIGKILL of the process, the sidecar's failure model; a power loss
or kernel crash of the node may lose the last commits before the next checkpoint (a
suffix of them, in commit order: one WAL). The job queue uses FULL (an fsync of the WAL
per commit, which also makes every earlier NORMAL commit durable). Where a node's power
loss must not lose a checkout, use PostgreSQL (synchronous_commit on).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import threading
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


class _SharedFile:
    """One file's thread and connection, shared by every runner of it in this process."""

    def __init__(self, path: str, timeout: float, thread_name: str) -> None:
        self.path = path
        self.timeout = timeout
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self.conn: sqlite3.Connection | None = None
        self.schemas: set[str] = set()  # created on `conn`
        self.synchronous: str = ""  # the level `conn` is set to
        self.users = 0

    def connection(self, schema: str, synchronous: Synchronous) -> sqlite3.Connection:
        """The open connection with `schema` created and `synchronous` set (thread side)."""
        if self.conn is None:
            self.conn = connect(self.path, schema, timeout=self.timeout, synchronous=synchronous)
            self.schemas, self.synchronous = {schema}, synchronous
        conn = self.conn
        if schema not in self.schemas:
            _while_busy(lambda: _create_schema(conn, schema), self.timeout)
            self.schemas.add(schema)
        if synchronous != self.synchronous:
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            self.synchronous = synchronous
        return conn

    def drop(self) -> None:
        """Forget a connection that failed, so the next call starts clean (thread side)."""
        conn, self.conn = self.conn, None
        self.schemas, self.synchronous = set(), ""
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


_SHARED: dict[str, _SharedFile] = {}
_SHARED_LOCK = threading.Lock()


def _shared_key(path: str) -> str | None:
    """Which file `path` is, for sharing; None for a private database (`:memory:`, "")."""
    if not path or path == ":memory:" or path.startswith("file:"):
        return None
    return os.path.realpath(path)


def database_of(path: str) -> str:
    """The identity of the file at `path` for joint writes (`proxy.storage.joint`): two
    stores of one file in one process write on one connection, so one may run the
    other's statement in its own transaction."""
    key = _shared_key(path)
    return f"sqlite://{key}" if key is not None else f"sqlite-private://{id(path)}"


class SqliteRunner:
    """A store's SQLite file: its transactions on the file's one thread and connection.

    `transaction(work)` runs `work` in an immediate transaction on the thread; `read(work)`
    runs a read-only `work` without one (each statement sees one consistent snapshot).
    Any sqlite3 error (the file cannot be opened, the lock timed out, the disk failed)
    drops the connection, so the next call starts clean, and is raised as
    `unavailable(name, detail)`, the store's own error; so is a call after `close()`.
    Runners of one file in one process share the thread and connection (`_SharedFile`).
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
        self.database = database_of(path)
        self._schema = schema
        self._unavailable = unavailable
        self._synchronous: Synchronous = synchronous
        self._closed = False
        key = _shared_key(path)
        with _SHARED_LOCK:
            shared = _SHARED.get(key) if key is not None else None
            if shared is None:
                shared = _SharedFile(path, timeout, thread_name)
                if key is not None:
                    _SHARED[key] = shared
            shared.users += 1
        self._key = key
        self._file = shared

    async def open(self) -> None:
        """Open the file and create the schema now rather than at the first call."""
        await self._on_thread(lambda conn: None)

    async def transaction(self, work: Work[T]) -> T:
        return await self._on_thread(lambda conn: immediate(conn, work))

    async def read(self, work: Work[T]) -> T:
        return await self._on_thread(work)

    async def close(self) -> None:
        """Leave the file; the last runner of it closes the connection and stops the
        thread. A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        shared = self._file
        with _SHARED_LOCK:
            shared.users -= 1
            last = shared.users <= 0
            if last and self._key is not None and _SHARED.get(self._key) is shared:
                del _SHARED[self._key]
        if not last:
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(RuntimeError):  # already shut down
            await loop.run_in_executor(shared.executor, shared.drop)
        shared.executor.shutdown(wait=False)

    async def _on_thread(self, work: Work[T]) -> T:
        if self._closed:
            raise self._unavailable(self.name, "the store is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._file.executor, self._run, work)
        except RuntimeError as exc:  # executor shut down: the store was closed
            raise self._unavailable(self.name, str(exc)) from exc

    # -- the thread side ---------------------------------------------------------------

    def _run(self, work: Work[T]) -> T:
        try:
            return work(self._file.connection(self._schema, self._synchronous))
        except sqlite3.Error as exc:
            self._file.drop()
            raise self._unavailable(self.name, f"{type(exc).__name__}: {exc}") from exc
