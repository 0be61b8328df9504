"""One SQLite file used from asyncio, as every SQLite-backed store uses it.

sqlite3 blocks, so a store's calls run on one dedicated thread that owns the
connection; the event loop never waits on the disk, and the single thread serialises
access to the connection. Calls reach it through a `BatchThread`, which hands them
over in batches: cheaper for the event loop than an executor's call at a time.

The file is in WAL mode, so readers run beside a writer, and every change is a
`BEGIN IMMEDIATE` transaction, which takes the write lock before the first read, so
two writers (tasks, threads or processes) never both edit the same old version of a
row.

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
suffix of them, in commit order: one WAL). The job queue asks for FULL: its commits
are durable when they return. On the shared connection that is a group commit
(`_GroupSync`): the transaction commits with NORMAL, then waits for an fsync of the WAL
made on another thread after its commit, shared by every commit waiting meanwhile; the
same guarantee as FULL without an fsync per commit holding up the file's thread (and
each fsync also makes every earlier NORMAL commit durable). Where a node's power loss
must not lose a checkout, use PostgreSQL (synchronous_commit on).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar

from proxy.storage.batch_thread import BatchThread

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
        self.thread = BatchThread(thread_name)
        self.conn: sqlite3.Connection | None = None
        self.wanted: tuple[str, ...] = ()  # the schema of every runner of the file
        self.schemas: set[str] = set()  # created on `conn`
        self.synchronous: str = ""  # the level `conn` is set to
        self.users = 0

    def want(self, schema: str) -> None:
        """Have `schema` created on the connection too (a new runner of the file)."""
        if schema not in self.wanted:
            self.wanted = (*self.wanted, schema)  # replaced whole: the thread reads it

    def connection(self, schema: str, synchronous: Synchronous) -> sqlite3.Connection:
        """The open connection with the schema of every runner of the file created (one
        store's transaction may write another's table: a joint write) and `synchronous`
        set (thread side)."""
        if self.conn is None:
            self.conn = connect(self.path, schema, timeout=self.timeout, synchronous=synchronous)
            self.schemas, self.synchronous = {schema}, synchronous
        conn = self.conn
        for wanted in (*self.wanted, schema):
            if wanted not in self.schemas:
                _while_busy(functools.partial(_create_schema, conn, wanted), self.timeout)
                self.schemas.add(wanted)
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


def _fsync_wal(path: str) -> None:
    """Make every commit written to `path`'s WAL so far durable (an fsync of the WAL).

    With `synchronous=NORMAL` a commit is written to the WAL (the OS's page cache)
    without an fsync; syncing the file afterwards makes it as durable as `FULL` would
    have. No WAL file: its commits were checkpointed into the database file, which a
    checkpoint syncs.
    """
    try:
        fd = os.open(path + "-wal", os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _GroupSync:
    """Group commit for a store that wants `FULL` durability on a shared connection.

    Its transactions commit with NORMAL on the file's thread, so an fsync never holds up
    the other stores' transactions there; then each waits, on a thread of its own, for an
    fsync of the WAL that started after its commit. Commits that wait at the same time
    share one fsync, so a burst of enqueues pays for one, not one each.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-fsync")
        self._started = 0  # fsyncs started
        self._finished = 0  # fsyncs ended (done or failed)
        self._running: asyncio.Future[None] | None = None
        self._running_number = 0
        self._dir_synced = False

    def _sync(self) -> None:
        _fsync_wal(self._path)
        if not self._dir_synced:  # the WAL's directory entry, once
            fd = os.open(os.path.dirname(os.path.abspath(self._path)), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._dir_synced = True

    def _start(self) -> asyncio.Future[None]:
        self._started += 1
        self._running_number = self._started
        running = asyncio.get_running_loop().run_in_executor(self._executor, self._sync)
        # retrieved here too, so a failure nobody waits for any more is not reported
        running.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._running = running
        return running

    async def after_commit(self) -> None:
        """Return once an fsync that started after the caller's commit has ended; raises
        its OSError if it failed."""
        needed = self._started + 1
        while self._finished < needed:
            running = self._running
            if running is None or running.done():
                running = self._start()
            number = self._running_number
            try:
                await asyncio.shield(running)  # a cancelled waiter leaves it running
            finally:
                if running.done():
                    self._finished = max(self._finished, number)

    def close(self) -> None:
        self._executor.shutdown(wait=False)


class SqliteRunner:
    """A store's SQLite file: its transactions on the file's one thread and connection.

    `transaction(work)` runs `work` in an immediate transaction on the thread; `read(work)`
    runs a read-only `work` without one (each statement sees one consistent snapshot).
    Any sqlite3 error (the file cannot be opened, the lock timed out, the disk failed)
    drops the connection, so the next call starts clean, and is raised as
    `unavailable(name, detail)`, the store's own error; so is a call after `close()`.
    Runners of one file in one process share the thread and connection (`_SharedFile`),
    and with them the busy timeout of the first to open it.
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
        key = _shared_key(path)
        # FULL on a real file is a NORMAL commit and a grouped fsync (`_GroupSync`)
        self._group = _GroupSync(path) if synchronous == "FULL" and key is not None else None
        self._synchronous: Synchronous = "NORMAL" if self._group is not None else synchronous
        self._closed = False
        with _SHARED_LOCK:
            shared = _SHARED.get(key) if key is not None else None
            if shared is None:
                shared = _SharedFile(path, timeout, thread_name)
                if key is not None:
                    _SHARED[key] = shared
            shared.users += 1
            shared.want(schema)
        self._key = key
        self._file = shared

    async def open(self) -> None:
        """Open the file and create the schema now rather than at the first call."""
        await self._on_thread(lambda conn: None)

    async def transaction(self, work: Work[T], *, durable: bool = True) -> T:
        """Run `work` in one immediate transaction on the file's thread.

        On a `FULL` runner, `durable=False` returns without waiting for the WAL's fsync:
        for a change whose loss in a power cut is harmless (a queue's take or ack: the
        job is run again, as at-least-once allows). The next durable commit's fsync
        covers it anyway, since the WAL is synced as a whole.
        """
        if self._group is None or not durable:
            return await self._on_thread(lambda conn: immediate(conn, work))

        def changing(conn: sqlite3.Connection) -> tuple[T, bool]:
            before = conn.total_changes
            result = immediate(conn, work)
            return result, conn.total_changes != before

        result, changed = await self._on_thread(changing)
        if changed:  # durable before it returns, as FULL promises
            try:
                await self._group.after_commit()
            except OSError as exc:
                raise self._unavailable(self.name, f"fsync of the WAL: {exc}") from exc
        return result

    async def read(self, work: Work[T]) -> T:
        return await self._on_thread(work)

    async def close(self) -> None:
        """Leave the file; the last runner of it closes the connection and stops the
        thread. A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._group is not None:
            self._group.close()
        shared = self._file
        with _SHARED_LOCK:
            shared.users -= 1
            last = shared.users <= 0
            if last and self._key is not None and _SHARED.get(self._key) is shared:
                del _SHARED[self._key]
        if not last:
            return
        with contextlib.suppress(RuntimeError):  # already shut down
            await shared.thread.run(shared.drop)
        shared.thread.shutdown()

    async def _on_thread(self, work: Work[T]) -> T:
        if self._closed:
            raise self._unavailable(self.name, "the store is closed")
        try:
            return await self._file.thread.run(functools.partial(self._run, work))
        except RuntimeError as exc:  # thread shut down: the store was closed
            raise self._unavailable(self.name, str(exc)) from exc

    # -- the thread side ---------------------------------------------------------------

    def _run(self, work: Work[T]) -> T:
        try:
            return work(self._file.connection(self._schema, self._synchronous))
        except sqlite3.Error as exc:
            self._file.drop()
            raise self._unavailable(self.name, f"{type(exc).__name__}: {exc}") from exc
