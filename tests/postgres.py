"""The PostgreSQL the store tests use: the server at 127.0.0.1:5432 (`.ci/run` starts it).

Each test gets a schema of its own (`fresh_schema`), dropped afterwards, so runs never
see each other's rows and the schema is migrated from nothing every time.
"""

from __future__ import annotations

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


def schema_url(schema: str, **params: str) -> str:
    query = "&".join(f"{key}={value}" for key, value in {"schema": schema, **params}.items())
    return f"{PG_URL}?{query}"
