"""The PostgreSQL the store tests use: the server at 127.0.0.1:5432 (`.ci/run` starts it).

Each test gets a schema of its own (`fresh_schema`), dropped afterwards, so runs never
see each other's rows and the schema is migrated from nothing every time.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
import pytest

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


async def pg_reachable() -> bool:
    try:
        conn = await psycopg.AsyncConnection.connect(PG_URL, connect_timeout=2)
    except psycopg.Error:
        return False
    await conn.close()
    return True


async def drop_schema(schema: str) -> None:
    async with await psycopg.AsyncConnection.connect(PG_URL, autocommit=True) as conn:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@asynccontextmanager
async def fresh_schema() -> AsyncIterator[str]:
    """A schema name no other test uses (skips when there is no server); dropped after."""
    if not await pg_reachable():
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    schema = f"t_{uuid.uuid4().hex[:16]}"
    try:
        yield schema
    finally:
        await drop_schema(schema)


async def row_count(schema: str, table: str) -> int:
    """How many rows `schema.table` holds, read on a connection of its own."""
    async with await psycopg.AsyncConnection.connect(PG_URL) as conn:
        cursor = await conn.execute(f'SELECT count(*) FROM "{schema}"."{table}"')
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


def schema_url(schema: str, **params: str) -> str:
    query = "&".join(f"{key}={value}" for key, value in {"schema": schema, **params}.items())
    return f"{PG_URL}?{query}"


class TcpGate:
    """A loopback TCP forwarder to the test server that a test can cut and restore: an
    outage of the database as its clients see it (refused connections, dropped sockets),
    without stopping the server other tests share."""

    def __init__(self, target_port: int = 5432) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/test"

    async def open(self) -> None:
        """Listen (on the same port again after `cut`)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Refuse new connections and drop every open one."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            pump = asyncio.create_task(_pump(source, sink))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        sink.transport.abort()
