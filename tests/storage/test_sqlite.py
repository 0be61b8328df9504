"""The shared SQLite plumbing: opening a file that other processes are opening too."""

from __future__ import annotations

import multiprocessing
import sqlite3
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from proxy.storage.sqlite import SqliteRunner, connect

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, value TEXT);
CREATE INDEX IF NOT EXISTS records_value ON records (value);
"""
OPENERS = 8
ROUNDS = 60
"""Before `connect` retried a locked WAL switch, about one round in ten failed (8 openers),
so 60 rounds all passing by chance was about a 1-in-1000 event."""


def _open_each_round(directory: str, rounds: int, barrier: Barrier, failures: Queue[str]) -> None:
    """In a child process: every round, open that round's fresh file together with the others."""
    for round_ in range(rounds):
        barrier.wait(timeout=60)
        try:
            connect(f"{directory}/{round_}.db", SCHEMA).close()
            failures.put("")
        except sqlite3.Error as exc:
            failures.put(f"round {round_}: {type(exc).__name__}: {exc}")


def test_processes_opening_a_new_file_at_once_never_find_it_locked(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(OPENERS)
    failures: Queue[str] = context.Queue()
    workers = [
        context.Process(target=_open_each_round, args=(str(tmp_path), ROUNDS, barrier, failures))
        for _ in range(OPENERS)
    ]
    for worker in workers:
        worker.start()
    try:
        reports = [failures.get(timeout=120) for _ in range(OPENERS * ROUNDS)]
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    assert [report for report in reports if report] == []
    for round_ in range(ROUNDS):
        with sqlite3.connect(tmp_path / f"{round_}.db") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


# -- one file, one connection per process; FULL as a group commit ----------------------------


async def test_runners_of_one_file_share_a_connection_and_each_schema(tmp_path: Path) -> None:
    from proxy.storage.sqlite import SqliteRunner

    def unavailable(name: str, detail: str) -> Exception:
        return RuntimeError(f"{name}: {detail}")

    path = str(tmp_path / "shared.db")
    one = SqliteRunner(
        path, "CREATE TABLE IF NOT EXISTS a (k TEXT);", name="a", unavailable=unavailable
    )
    two = SqliteRunner(
        path, "CREATE TABLE IF NOT EXISTS b (k TEXT);", name="b", unavailable=unavailable
    )
    try:
        # the first runner's transaction may write the second's table (a joint write)
        await one.transaction(lambda conn: conn.execute("INSERT INTO b VALUES ('x')"))
        conn_one = await one.read(lambda conn: conn)
        conn_two = await two.read(lambda conn: conn)
        assert conn_one is conn_two
        assert await two.read(lambda conn: conn.execute("SELECT k FROM b").fetchall()) == [("x",)]
    finally:
        await one.close()
        await two.close()
    again = SqliteRunner(path, "", name="c", unavailable=unavailable)
    try:  # the last close closed the connection; a new runner opens a new one
        assert await again.read(lambda conn: conn) is not conn_one
    finally:
        await again.close()


def _full_runner(tmp_path: Path) -> SqliteRunner:
    """A queue-like runner of a file of its own that asks for `FULL` (a group commit)."""

    def unavailable(name: str, detail: str) -> Exception:
        return RuntimeError(f"{name}: {detail}")

    return SqliteRunner(
        str(tmp_path / "queue.db"),
        "CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY);",
        name="q",
        unavailable=unavailable,
        synchronous="FULL",
    )


async def test_full_commits_wait_for_an_fsync_after_them_and_share_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio
    import time

    from proxy.storage import sqlite as sqlite_module

    syncs: list[tuple[float, float]] = []
    real = sqlite_module._fsync_wal

    def slow_fsync(path: str) -> None:
        started = time.monotonic()
        time.sleep(0.02)
        real(path)
        syncs.append((started, time.monotonic()))

    monkeypatch.setattr(sqlite_module, "_fsync_wal", slow_fsync)

    runner = _full_runner(tmp_path)

    async def commit() -> tuple[float, float]:
        committed = await runner.transaction(
            lambda conn: (conn.execute("INSERT INTO jobs DEFAULT VALUES"), time.monotonic())[1]
        )
        return committed, time.monotonic()

    try:
        results = await asyncio.gather(*(commit() for _ in range(20)))
        # no change, no fsync
        before = len(syncs)
        await runner.transaction(lambda conn: conn.execute("DELETE FROM jobs WHERE id < 0"))
        assert len(syncs) == before
    finally:
        await runner.close()
    assert 1 <= len(syncs) < 20, "concurrent commits share fsyncs"
    for committed, returned in results:  # each returned after an fsync that began after it
        assert any(committed <= began and ended <= returned for began, ended in syncs)


async def test_a_commit_that_need_not_be_durable_waits_for_no_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A queue's take and ack (`durable=False`) commit without an fsync of their own;
    the next durable commit's fsync covers them."""
    from proxy.storage import sqlite as sqlite_module

    syncs: list[str] = []
    real = sqlite_module._fsync_wal

    def counted(path: str) -> None:
        syncs.append(path)
        real(path)

    monkeypatch.setattr(sqlite_module, "_fsync_wal", counted)

    runner = _full_runner(tmp_path)
    try:
        for _ in range(3):
            await runner.transaction(
                lambda conn: conn.execute("INSERT INTO jobs DEFAULT VALUES"), durable=False
            )
        assert syncs == []
        await runner.transaction(lambda conn: conn.execute("INSERT INTO jobs DEFAULT VALUES"))
        assert len(syncs) == 1
        count = await runner.read(lambda conn: conn.execute("SELECT COUNT(*) FROM jobs").fetchone())
        assert count == (4,)
    finally:
        await runner.close()
