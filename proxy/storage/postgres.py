"""PostgreSQL as every PostgreSQL-backed store reaches it: a pool, the schema, the errors.

The idempotency store, the checkout journal and the job queue of a `postgresql://` URL
each hold a `PostgresDatabase`: a psycopg 3 `AsyncConnectionPool` built from the URL
(without our own parameters, see `proxy.storage.url`), whose connections carry a short
`connect_timeout` and `statement_timeout`, so an outage or a stuck lock is reported
promptly as the store's own `StoreUnavailable` subclass rather than hanging a checkout.
Every message is scrubbed of the URL's password and raised outside the driver's
`except` block, so not even the chained exception can show it.

The tables live in one schema (`?schema=`, default `checkout_sidecar`), created and
migrated on first use: a `schema_versions` table and `MIGRATIONS`, an ordered list,
applied inside one transaction that first takes `pg_advisory_xact_lock(MIGRATION_LOCK)`.
Replicas that start together queue on that lock; the first applies what is missing,
the others then find every version recorded and apply nothing. All three stores share
one list (and one version number), because one URL usually serves all three and a
schema is upgraded as a whole.

Timestamps are the stores' injected wall clock (`time.time`), as in the SQLite stores,
so tests drive expiry with a fake clock; replicas must keep their clocks in sync (NTP),
which they need for the journal's deadlines anyway.
"""

from __future__ import annotations

import asyncio
import re
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from proxy import jsoncodec

DEFAULT_SCHEMA = "checkout_sidecar"
DEFAULT_TIMEOUT = 5.0
"""Seconds a statement may run (lock waits included) before it fails: `?timeout=`."""
CONNECT_TIMEOUT = 2.0
"""Seconds to open a connection; libpq's `connect_timeout=` in the URL overrides it."""
POOL_MAX_SIZE = 8
"""Connections per store object; a sidecar holds three stores, and PostgreSQL's default
`max_connections` is 100, so a dozen replicas fit."""
RECENTLY_USED = 1.0
"""Seconds after its return during which a pooled connection is lent without a check."""

MIGRATION_LOCK = 0x636B6F75745F7367  # "ckout_sg": any constant the sidecar alone uses
"""The `pg_advisory_xact_lock` key every opener takes before migrating."""

Connection = psycopg.AsyncConnection[tuple[Any, ...]]
Statement = tuple[str, Sequence[Any] | Mapping[str, Any]]
"""SQL text and its parameters."""
Unavailable = Callable[[str, str], Exception]
"""A store's error class: `unavailable(name, detail)`."""


class Conflict(Exception):
    """A statement guarded by `{schema}.expect_rows` changed no row: its transaction
    was rolled back, and the caller decides what to do instead (a slower path)."""


_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema; `sql` names tables as `{schema}.table`."""

    version: int
    why: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "idempotency records, the checkout journal and the job queue",
        """
CREATE TABLE {schema}.idempotency_records (
    key         text PRIMARY KEY,
    fingerprint text NOT NULL,
    state       text NOT NULL CHECK (state IN ('in_progress', 'completed')),
    response    text,
    expires_at  double precision NOT NULL
);
CREATE INDEX idempotency_records_expires_at ON {schema}.idempotency_records (expires_at);

CREATE TABLE {schema}.checkout_journal (
    id          text PRIMARY KEY,
    state       text NOT NULL,
    created_at  double precision NOT NULL,
    expires_at  double precision,
    record      jsonb NOT NULL
);
CREATE INDEX checkout_journal_unfinished ON {schema}.checkout_journal (created_at, id)
    WHERE state <> 'final';
CREATE INDEX checkout_journal_expires_at ON {schema}.checkout_journal (expires_at)
    WHERE expires_at IS NOT NULL;

CREATE TABLE {schema}.jobs (
    id          text PRIMARY KEY,
    type        text NOT NULL,
    body        jsonb NOT NULL,
    state       text NOT NULL CHECK (state IN ('pending', 'running', 'dead')),
    created_at  double precision NOT NULL,
    run_at      double precision NOT NULL,
    lease_owner text,
    lease_token text,
    lease_until double precision,
    dead_at     double precision
);
CREATE INDEX jobs_due ON {schema}.jobs (run_at, created_at) WHERE state = 'pending';
CREATE INDEX jobs_lease ON {schema}.jobs (lease_until) WHERE state = 'running';
CREATE INDEX jobs_dead ON {schema}.jobs (dead_at, id) WHERE state = 'dead';
CREATE INDEX jobs_owed ON {schema}.jobs (created_at) WHERE state <> 'dead';
""",
    ),
    Migration(
        2,
        "shared rate limits: one GCRA bucket per upstream",
        """
CREATE TABLE {schema}.rate_limits (
    key   text PRIMARY KEY,
    tat   bigint NOT NULL
);
""",
    ),
    Migration(
        3,
        "the checkout events outbox, written in the journal's transactions",
        """
CREATE TABLE {schema}.checkout_outbox (
    seq          bigserial PRIMARY KEY,
    id           text NOT NULL UNIQUE,
    checkout_id  text NOT NULL,
    type         text NOT NULL,
    body         jsonb NOT NULL
);
""",
    ),
    Migration(
        4,
        "journal revisions for one-round-trip compare-and-set writes",
        """
ALTER TABLE {schema}.checkout_journal ADD COLUMN revision bigint NOT NULL DEFAULT 0;

-- Every update of a record bumps its revision, whoever writes it (an older sidecar
-- during a rolling upgrade too), so a writer holding a stale copy can never overwrite.
CREATE FUNCTION {schema}.checkout_journal_revise() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.revision := OLD.revision + 1;
    RETURN NEW;
END
$$;
CREATE TRIGGER checkout_journal_revise BEFORE UPDATE ON {schema}.checkout_journal
    FOR EACH ROW EXECUTE FUNCTION {schema}.checkout_journal_revise();

-- A statement that must change a row raises when it changed none, which aborts its
-- whole transaction: a pipelined write needs no round trip to look at the count.
CREATE FUNCTION {schema}.expect_rows(changed bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    IF changed = 0 THEN
        RAISE EXCEPTION 'the row was changed or is gone' USING ERRCODE = 'CK409';
    END IF;
    RETURN changed;
END
$$;
""",
    ),
)

CONFLICT_SQLSTATE = "CK409"
"""The SQLSTATE of `{schema}.expect_rows` finding no row changed."""


def quoted_schema(schema: str) -> str:
    """The schema as a quoted identifier; only plain lower-case names are accepted, so
    the name can be put into SQL text safely and means the same quoted or not."""
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(
            f"schema={schema!r} is not a plain name (lower-case letters, digits and _,"
            " at most 63, not starting with a digit)"
        )
    return f'"{schema}"'


def database_of(conninfo: str) -> str:
    """Which database a connection string reaches: user, host, port and name.

    Two stores whose URLs reach the same database (whatever their schema, password or
    options) can write in one transaction; see `proxy.storage.joint`.
    """
    params = conninfo_to_dict(conninfo)
    user = params.get("user") or ""
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    dbname = params.get("dbname") or user
    return f"postgresql://{user}@{host}:{port}/{dbname}"


class PostgresDatabase:
    """One store's way into PostgreSQL: a lazily opened pool and a migrated schema.

    `connection()` lends a pooled connection in autocommit mode and `transaction()` one
    inside a transaction (committed when the block ends, rolled back if it raises);
    any driver or pool failure inside either becomes `unavailable(name, detail)`, and a
    broken connection is dropped by the pool, so the store works again by itself once
    the server is back. The first use opens the pool and migrates; a failed migration
    is tried again on the next use.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        name: str,
        unavailable: Unavailable,
        schema: str = DEFAULT_SCHEMA,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        max_size: int = POOL_MAX_SIZE,
        scrub: Callable[[str], str] = lambda text: text,
    ) -> None:
        try:
            params = conninfo_to_dict(conninfo)
        except psycopg.ProgrammingError as exc:
            raise ValueError(scrub(str(exc))) from None
        self.schema = quoted_schema(schema)
        """Quoted, for SQL text: `"checkout_sidecar"`."""
        self.schema_name = schema
        self.name = name
        self.database = database_of(conninfo)
        self._conninfo = conninfo
        self._unavailable = unavailable
        self._scrub = scrub
        self._connect_timeout = float(params.get("connect_timeout") or connect_timeout)
        self._kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in params:
            self._kwargs["connect_timeout"] = max(1, round(connect_timeout))
        if "options" not in params:  # a URL's own options= replaces the timeout
            self._kwargs["options"] = f"-c statement_timeout={max(1, round(timeout * 1000))}"
        self._max_size = max_size
        self._returned: weakref.WeakKeyDictionary[Connection, float] = weakref.WeakKeyDictionary()
        self._pool: AsyncConnectionPool[Connection] | None = None
        self._migrated = False
        self._opening = asyncio.Lock()
        self._closed = False

    def sql(self, text: str) -> str:
        """`text` with `{schema}` replaced by this store's quoted schema."""
        return text.replace("{schema}", self.schema)

    # -- opening ------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the pool and migrate the schema now, rather than at the first call."""
        async with self.connection():
            pass

    async def _ready_pool(self) -> AsyncConnectionPool[Connection]:
        if self._closed:
            raise self._unavailable(self.name, "the store is closed")
        if self._pool is not None and self._migrated:
            return self._pool
        async with self._opening:
            if self._pool is None:
                self._pool = AsyncConnectionPool(
                    self._conninfo,
                    kwargs=self._kwargs,
                    min_size=0,
                    max_size=self._max_size,
                    open=False,
                    timeout=self._connect_timeout,
                    # give up a failing connection attempt as soon as a client would have
                    # (the next client starts a fresh one): with psycopg_pool's default
                    # of 5 minutes, an attempt backing off exponentially through a long
                    # outage would find a returned server only tens of seconds late
                    reconnect_timeout=self._connect_timeout,
                    check=self._check,
                    configure=_configure,
                    name=self.name,
                )
                await self._pool.open(wait=False)
            if not self._migrated:
                async with self._pool.connection() as conn:
                    await migrate(conn, self.schema)
                self._migrated = True
        return self._pool

    async def _check(self, conn: Connection) -> None:
        """The pool's check before lending `conn`: a round trip to the server, skipped
        for a connection given back moments ago (its last statement just succeeded), so
        a busy store pays no extra round trip per operation. A connection the server
        dropped within that moment fails its next statement: a prompt 503, and the pool
        replaces it, as after any outage."""
        returned = self._returned.get(conn)
        if returned is not None and time.monotonic() - returned < RECENTLY_USED:
            return
        await AsyncConnectionPool.check_connection(conn)

    # -- lending connections --------------------------------------------------------------

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A pooled connection in autocommit mode; driver failures as the store's error,
        except `expect_rows` finding no row, which is a `Conflict`."""
        detail = ""
        conflict = False
        try:
            pool = await self._ready_pool()
            async with pool.connection() as conn:
                try:
                    yield conn
                except psycopg.Error as exc:
                    if exc.sqlstate == CONFLICT_SQLSTATE:  # the connection is fine
                        self._returned[conn] = time.monotonic()
                    raise
                self._returned[conn] = time.monotonic()
            return
        except PoolTimeout:
            detail = (
                f"no connection within {self._connect_timeout:g}s"
                " (server down, unreachable or out of connections)"
            )
        except psycopg.Error as exc:
            if exc.sqlstate == CONFLICT_SQLSTATE:
                conflict = True
            detail = f"{type(exc).__name__}: {exc}".strip()
        except OSError as exc:
            detail = f"{type(exc).__name__}: {exc}".strip()
        if conflict:
            raise Conflict(detail)
        # raised here, outside the except block, so no driver exception is chained
        raise self._unavailable(self.name, self._scrub(detail))

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        """A pooled connection inside one transaction, committed when the block ends."""
        async with self.connection() as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def pipelined(self) -> AsyncIterator[Connection]:
        """One transaction in pipeline mode: BEGIN goes with the first statement and
        COMMIT with the last, and statements whose results are not read wait to be sent
        together, so a write transaction costs one round trip and a read-modify-write
        two (the read, then the writes and the commit).

        BEGIN and COMMIT are queued as plain statements and the pipeline synced once
        at the end: psycopg's `transaction()` inside a pipeline syncs at its end, again
        after its COMMIT and once more when the pipeline ends, three round trips for
        what is one. A statement that fails makes the server skip the rest (COMMIT
        included) until the sync, whose answer raises it; the transaction, left
        aborted, is then rolled back here. A block that raises is rolled back too.
        """
        async with self.connection() as conn:
            try:
                async with conn.pipeline():
                    await conn.execute("BEGIN", prepare=False)
                    yield conn
                    await conn.execute("COMMIT", prepare=False)
            except BaseException:
                await conn.rollback()  # nothing once the server is idle again
                raise

    async def atomically(self, statements: Sequence[Statement]) -> list[int]:
        """Run `statements` as one transaction in one round trip; their row counts.

        They go as one simple-protocol query of several statements, parameters bound
        client-side (psycopg quotes them), which the server runs as one implicit
        transaction: all commit, durably, or at the first error none do. A pipeline
        would do the same in one round trip too, but psycopg spends an event-loop turn
        on every statement it queues, which costs more CPU than the whole query.
        """
        async with self.connection() as conn:
            if len(statements) == 1:
                # one statement (a checkout's decision, usually): prepared, so the server
                # parses and plans it once per connection and the client quotes nothing
                sql, params = statements[0]
                single = await conn.execute(sql, params, prepare=True)
                return [single.rowcount]
            cursor = await _one_query(conn, statements)
            counts = [cursor.rowcount]
            while cursor.nextset():
                counts.append(cursor.rowcount)
            return counts

    async def listener(self) -> Connection:
        """A connection of its own, outside the pool, for LISTEN: it waits for
        notifications between calls, which a pooled connection must not."""
        detail = ""
        try:
            await self._ready_pool()  # the schema (and so the channel's users) exist
            return await psycopg.AsyncConnection.connect(self._conninfo, **self._kwargs)
        except (psycopg.Error, OSError) as exc:
            detail = f"{type(exc).__name__}: {exc}".strip()
        raise self._unavailable(self.name, self._scrub(detail))

    async def close(self) -> None:
        """Close the pool; a second call does nothing, a later use is refused."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


async def _one_query(
    conn: Connection, statements: Sequence[Statement]
) -> psycopg.AsyncClientCursor[tuple[Any, ...]]:
    """`statements` sent as one simple-protocol query, parameters bound client-side
    (psycopg quotes them); the server runs them as one implicit transaction."""
    cursor = psycopg.AsyncClientCursor(conn)
    text = ";\n".join(cursor.mogrify(sql, params) for sql, params in statements)
    await cursor.execute(text, prepare=False)
    return cursor


async def _configure(conn: Connection) -> None:
    """A new pooled connection decodes JSONB with orjson (`proxy.jsoncodec`): a
    checkout's record comes back as JSONB on every read, and psycopg's default,
    the standard library's json, cost several times more CPU for the same dict."""
    set_json_loads(jsoncodec.loads, conn)


async def migrate(conn: Connection, schema: str) -> list[int]:
    """Bring `schema` (quoted) up to the last of `MIGRATIONS`; the versions applied.

    One transaction under `pg_advisory_xact_lock(MIGRATION_LOCK)`: concurrent openers
    wait for each other, so each migration runs once and a half-applied one never
    commits. The lock is released with the transaction.
    """
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {schema}.schema_versions ("
            " version integer PRIMARY KEY,"
            " why text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cursor = await conn.execute(f"SELECT version FROM {schema}.schema_versions")
        done = {int(row[0]) for row in await cursor.fetchall()}
        for migration in MIGRATIONS:
            if migration.version in done:
                continue
            await conn.execute(migration.sql.replace("{schema}", schema))
            await conn.execute(
                f"INSERT INTO {schema}.schema_versions (version, why) VALUES (%s, %s)",
                (migration.version, migration.why),
            )
            applied.append(migration.version)
    return applied
