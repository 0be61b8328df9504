"""The shared SQLite plumbing: opening a file that other processes are opening too."""

from __future__ import annotations

import multiprocessing
import sqlite3
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

from proxy.storage.sqlite import connect

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
