"""Expired final records are still swept from the SQL journals, though a sweep now
rides with at most one final write per `SWEEP_EVERY` (`proxy.storage.sweep`)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from proxy.checkout.journal import CheckoutRecord, Journal
from proxy.resilience.clock import FakeClock
from proxy.storage.open import open_journal
from proxy.storage.sweep import SWEEP_EVERY
from tests.postgres import fresh_schema, row_count, schema_url

TTL = 60.0


@dataclass
class Opened:
    """A journal and a way to count its table's rows behind its back."""

    journal: Journal
    count_rows: Callable[[], Awaitable[int]]

    async def rows(self) -> int:
        return await self.count_rows()


@pytest.fixture(params=["sqlite", "postgresql"])
async def opened(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[Opened]:
    if request.param == "sqlite":
        path = tmp_path / "j.db"
        journal = await open_journal(f"sqlite:///{path}?ttl={TTL}", wall=clock)

        async def sqlite_rows() -> int:
            with sqlite3.connect(path) as conn:
                return int(conn.execute("SELECT count(*) FROM checkout_journal").fetchone()[0])

        try:
            yield Opened(journal, sqlite_rows)
        finally:
            await journal.close()
        return
    async with fresh_schema() as schema:
        journal = await open_journal(schema_url(schema, ttl=str(TTL)), wall=clock)

        async def postgres_rows() -> int:
            return await row_count(schema, "checkout_journal")

        try:
            yield Opened(journal, postgres_rows)
        finally:
            await journal.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


def _record(checkout_id: str, state: str = "started") -> CheckoutRecord:
    return CheckoutRecord(id=checkout_id, key=f"key-{checkout_id}", state=state)


async def test_a_later_final_write_sweeps_records_expired_meanwhile(
    opened: Opened, clock: FakeClock
) -> None:
    journal = opened.journal
    for name in ("old-1", "old-2"):
        await journal.create(_record(name))
        await journal.update(name, state="final", decision="confirmed")
    await journal.create(_record("new"))
    assert await opened.rows() == 3

    clock.advance(TTL + SWEEP_EVERY)
    await journal.update("new", state="final", decision="confirmed")

    assert await opened.rows() == 1
    assert await journal.get("new") is not None
