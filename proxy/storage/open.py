"""One opener from a store URL to a backend, for each durable store.

The idempotency store, the checkout journal and the job queue each have a protocol
module (`proxy/idempotency/store.py`, `proxy/checkout/journal.py`, `proxy/jobs/queue.py`)
and backends that implement it; this module is the only place that knows which backend
a URL scheme names. `BACKENDS` lists them per store kind: a new backend (PostgreSQL)
is one factory per kind here plus its modules, and joins each store's contract tests.

Every URL is read by `StoreUrl` (our own parameters, the redacted name, the SQLite
path); every error about a URL names the store kind and the redacted URL, never the
password. Backends are imported when a URL names them, so a SQLite-only sidecar never
imports redis-py or psycopg.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from proxy.checkout.journal import DEFAULT_TTL, Journal
from proxy.idempotency.store import IdempotencyStore
from proxy.jobs.queue import JobQueue, WallClock
from proxy.resilience.clock import Clock
from proxy.storage.url import StoreKind, StoreUrl

if TYPE_CHECKING:  # redis-py and psycopg are imported only when a URL names them
    from proxy.storage.postgres import PostgresDatabase, Unavailable
    from proxy.storage.replicas import ReplicatedRedis


IdempotencyFactory = Callable[[StoreUrl, Clock | None], IdempotencyStore]
JournalFactory = Callable[[StoreUrl, WallClock], Awaitable[Journal]]
QueueFactory = Callable[[StoreUrl, WallClock], Awaitable[JobQueue]]
Factory = TypeVar("Factory")

REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel")
"""Redis as a store: redis-py's URL forms (TCP, TLS, a unix socket such as
`unix:///run/redis.sock?db=0`) and a master found through its Sentinels
(`redis+sentinel://h1:26379,h2:26379/mymaster/0`, read by `proxy.storage.sentinel`)."""

POSTGRES_SCHEMES = ("postgresql", "postgres")
"""libpq's URL forms; both mean the same."""

AMQP_SCHEMES = ("amqp", "amqps")
"""RabbitMQ (aio-pika's URL forms: plain and TLS); only the job queue lives there."""

REDIS_SOCKET_TIMEOUT = 2.0
REDIS_CONNECT_TIMEOUT = 1.0
"""Seconds; short, so an outage is reported promptly. `socket_timeout=` and
`socket_connect_timeout=` in the URL override them."""


# -- idempotency store ----------------------------------------------------------------


def _memory_idempotency(url: StoreUrl, clock: Clock | None) -> IdempotencyStore:
    from proxy.idempotency.memory_store import DEFAULT_MAXSIZE, MemoryStore
    from proxy.resilience.clock import monotonic

    return MemoryStore(maxsize=url.count("maxsize", DEFAULT_MAXSIZE), clock=clock or monotonic)


def _sqlite_idempotency(url: StoreUrl, clock: Clock | None) -> IdempotencyStore:
    from proxy.idempotency.sqlite_store import SqliteStore
    from proxy.storage.sqlite import DEFAULT_TIMEOUT

    return SqliteStore(
        url.sqlite_path,
        name=url.name,
        clock=clock or time.time,  # timestamps are persisted: wall time
        timeout=url.seconds("timeout", DEFAULT_TIMEOUT),
    )


def _redis_idempotency(url: StoreUrl, clock: Clock | None) -> IdempotencyStore:
    from proxy.idempotency.redis_store import DEFAULT_PREFIX, RedisStore

    # expiry is Redis's own (PX): no clock
    return RedisStore(redis_client(url), name=url.name, prefix=url.prefix(DEFAULT_PREFIX))


def _postgres_idempotency(url: StoreUrl, clock: Clock | None) -> IdempotencyStore:
    from proxy.idempotency.postgres_store import PostgresStore
    from proxy.idempotency.store import IdempotencyStoreUnavailable

    database = postgres_database(url, IdempotencyStoreUnavailable)
    return PostgresStore(database, clock=clock or time.time)  # persisted: wall time


# -- checkout journal -----------------------------------------------------------------


async def _memory_journal(url: StoreUrl, wall: WallClock) -> Journal:
    from proxy.checkout.journal_memory import DEFAULT_MAXSIZE, MemoryJournal

    return MemoryJournal(
        ttl=url.seconds("ttl", DEFAULT_TTL),
        maxsize=url.count("maxsize", DEFAULT_MAXSIZE),
        wall=wall,
    )


async def _sqlite_journal(url: StoreUrl, wall: WallClock) -> Journal:
    from proxy.checkout.journal_sqlite import SqliteJournal
    from proxy.storage.sqlite import DEFAULT_TIMEOUT

    return SqliteJournal(
        url.sqlite_path,
        name=url.name,
        ttl=url.seconds("ttl", DEFAULT_TTL),
        wall=wall,
        timeout=url.seconds("timeout", DEFAULT_TIMEOUT),
    )


async def _redis_journal(url: StoreUrl, wall: WallClock) -> Journal:
    from proxy.checkout.journal_redis import DEFAULT_PREFIX, RedisJournal

    return RedisJournal(
        redis_client(url, decode_responses=True),
        name=url.name,
        prefix=url.prefix(DEFAULT_PREFIX),
        ttl=url.seconds("ttl", DEFAULT_TTL),
        wall=wall,
    )


async def _postgres_journal(url: StoreUrl, wall: WallClock) -> Journal:
    from proxy.checkout.journal import JournalUnavailable
    from proxy.checkout.journal_postgres import PostgresJournal

    database = postgres_database(url, JournalUnavailable)
    journal = PostgresJournal(database, ttl=url.seconds("ttl", DEFAULT_TTL), wall=wall)
    # Migrate now, so the journal's table exists before any insert of it runs in another
    # store's transaction (`joint_create`); a server that is down now is tried again on
    # the first operation, as the other journals connect only then.
    with contextlib.suppress(JournalUnavailable):
        await database.open()
    return journal


# -- job queue ------------------------------------------------------------------------


async def _sqlite_queue(url: StoreUrl, wall: WallClock) -> JobQueue:
    from proxy.jobs.sqlite_queue import SqliteQueue
    from proxy.storage.sqlite import DEFAULT_TIMEOUT

    return await SqliteQueue.open(
        url.sqlite_path, name=url.name, wall=wall, timeout=url.seconds("timeout", DEFAULT_TIMEOUT)
    )


async def _redis_queue(url: StoreUrl, wall: WallClock) -> JobQueue:
    from proxy.jobs.redis_queue import DEFAULT_PREFIX, RedisQueue

    return await RedisQueue.open(
        redis_client(url, decode_responses=True),
        name=url.name,
        prefix=url.prefix(DEFAULT_PREFIX),
        wall=wall,
    )


async def _postgres_queue(url: StoreUrl, wall: WallClock) -> JobQueue:
    from proxy.jobs.postgres_queue import PostgresQueue
    from proxy.jobs.queue import QueueUnavailable

    return await PostgresQueue.open(postgres_database(url, QueueUnavailable), wall=wall)


# -- whether a store outlives a restart of its server -----------------------------------

VOLATILE_SCHEMES = frozenset({"memory"})
"""Backends that keep nothing past the process. Files and databases (SQLite,
PostgreSQL) keep what they committed; Redis keeps it only when it persists (asked)."""

DURABILITY_PROBE_TIMEOUT = 5.0
"""Seconds the start waits to learn a Redis store's persistence before calling it unknown."""


@dataclass(frozen=True, slots=True)
class Durability:
    """Whether a store keeps its data over a restart of its server, and why we think so."""

    durable: bool | None
    """None: unknown (CONFIG refused, or the server did not answer)."""
    detail: str
    caveat: str = ""
    """A risk to the data besides a restart (a Sentinel master that loses writes in a
    failover), worth a warning even when the store is durable."""


async def probe_durability(url: str) -> Durability:
    """Whether the store `url` names outlives a restart of the process or server behind it.

    Redis is asked (`CONFIG GET appendonly` and `save`) on a connection of its own; any
    failure to learn it is `durable=None`, never an error: a start must not fail
    because the store is briefly away (its calls then fail as `StoreUnavailable`).
    """
    parsed = StoreUrl.parse(url, "checkout journal")  # the kind only words errors
    if parsed.scheme in VOLATILE_SCHEMES:
        return Durability(False, "kept in this process's memory only")
    if parsed.scheme not in REDIS_SCHEMES:
        return Durability(True, f"{parsed.scheme} keeps what it committed")
    from proxy.storage.redis import failover_caveat, persistence

    try:
        client = redis_client(parsed, decode_responses=True)
    except ValueError as exc:
        return Durability(None, parsed.scrub(str(exc)))
    try:
        async with asyncio.timeout(DURABILITY_PROBE_TIMEOUT):
            durable, detail = await persistence(client)
            sentinel = parsed.scheme == "redis+sentinel"
            caveat = await failover_caveat(client) if sentinel else ""
    except Exception as exc:  # unreachable, timed out, refused: unknown, not fatal
        return Durability(None, parsed.scrub(f"not asked: {type(exc).__name__}: {exc}"))
    finally:
        await client.aclose()
    return Durability(durable, parsed.scrub(detail), caveat)


async def _amqp_queue(url: StoreUrl, wall: WallClock) -> JobQueue:
    from proxy.jobs.amqp_queue import DEFAULT_PREFETCH, DEFAULT_PREFIX, DEFAULT_TIMEOUT, AmqpQueue

    return await AmqpQueue.open(
        url.client_url,
        name=url.name,
        prefix=url.prefix(DEFAULT_PREFIX),
        prefetch=url.count("prefetch", DEFAULT_PREFETCH),
        timeout=url.seconds("timeout", DEFAULT_TIMEOUT),
        wall=wall,
        scrub=url.scrub,
    )


# -- the one list of backends ---------------------------------------------------------

IDEMPOTENCY_BACKENDS: Mapping[str, IdempotencyFactory] = {
    "memory": _memory_idempotency,
    "sqlite": _sqlite_idempotency,
    **dict.fromkeys(REDIS_SCHEMES, _redis_idempotency),
    **dict.fromkeys(POSTGRES_SCHEMES, _postgres_idempotency),
}
JOURNAL_BACKENDS: Mapping[str, JournalFactory] = {
    "memory": _memory_journal,
    "sqlite": _sqlite_journal,
    **dict.fromkeys(REDIS_SCHEMES, _redis_journal),
    **dict.fromkeys(POSTGRES_SCHEMES, _postgres_journal),
}
QUEUE_BACKENDS: Mapping[str, QueueFactory] = {
    # no memory:// queue: jobs must outlive the process (the config puts a memory://
    # default store's queue in a SQLite file)
    "sqlite": _sqlite_queue,
    **dict.fromkeys(REDIS_SCHEMES, _redis_queue),
    **dict.fromkeys(POSTGRES_SCHEMES, _postgres_queue),
    **dict.fromkeys(AMQP_SCHEMES, _amqp_queue),
}
BACKENDS: Mapping[StoreKind, Mapping[str, object]] = {
    "idempotency store": IDEMPOTENCY_BACKENDS,
    "checkout journal": JOURNAL_BACKENDS,
    "job queue": QUEUE_BACKENDS,
}
"""Scheme -> backend factory, per store kind."""

EXAMPLES = {
    "memory": "memory://",
    "sqlite": "sqlite:///path/to.db",
    "redis": "redis://host:6379/0",
    "rediss": "rediss://host:6380/0",
    "unix": "unix:///path/to/redis.sock?db=0",
    "postgresql": "postgresql://user:password@host:5432/db",
    "postgres": "postgres://user:password@host:5432/db",
    "redis+sentinel": "redis+sentinel://host:26379,host:26380/mymaster/0",
    "amqp": "amqp://user:password@host:5672/%2F",
    "amqps": "amqps://user:password@host:5671/%2F",
}
"""How each scheme is written, for the error that refuses an unknown one."""


def open_idempotency_store(url: str, *, clock: Clock | None = None) -> IdempotencyStore:
    """The idempotency store `url` names; nothing connects until the first operation.

    - `memory://[?maxsize=N]`: process-local, bounded; `clock` defaults to monotonic.
    - `sqlite:///abs/path.db[?timeout=S]` (also `sqlite://rel/path.db`): survives
      restarts; `clock` is wall time (`time.time`) because timestamps are persisted.
    - `redis://[user:password@]host:port/db[?prefix=P]`, `rediss://`, `unix:///path.sock`,
      `redis+sentinel://[user:password@]h1:26379,h2:26380/service/db[?sentinel_password=S]`:
      shared by replicas; expiry is Redis's own, `clock` is not used. Every Redis store
      takes `?wait_replicas=N|all&replica_timeout=S` (`redis_client`).
    - `postgresql://user:password@host:5432/db[?schema=S&timeout=S]` (or `postgres://`):
      shared by replicas; `clock` is wall time, as for SQLite.
    """
    parsed, factory = _backend(url, "idempotency store", IDEMPOTENCY_BACKENDS)
    with _named_errors(parsed):
        return factory(parsed, clock)


async def open_journal(url: str, *, wall: WallClock = time.time) -> Journal:
    """The checkout journal `url` names; nothing connects until the first operation
    (PostgreSQL's is migrated now when the server answers).

    - `memory://[?ttl=S&maxsize=N]`: this process only.
    - `sqlite:///abs/path.db[?timeout=S&ttl=S]`: one sidecar; may share its file with the
      other stores.
    - `redis://[user:password@]host:port/db[?prefix=P&ttl=S]`, `rediss://`,
      `unix:///path.sock?db=N`, `redis+sentinel://h1:26379,h2:26380/service/db`: shared
      by replicas.

    `ttl` (seconds, or a duration such as `168h`) is how long a final record is kept.
    `wall` stamps `created_at`/`updated_at` and decides what `unfinished` finds old enough.
    """
    parsed, factory = _backend(url, "checkout journal", JOURNAL_BACKENDS)
    with _named_errors(parsed):
        return await factory(parsed, wall)


async def open_queue(url: str, *, wall: WallClock = time.time) -> JobQueue:
    """The job queue `url` names, opened now (a failure raises `QueueUnavailable`).

    - `sqlite:///abs/path.db[?timeout=S]` (the default; the directory is created);
    - `redis://host:port/db?prefix=jobs:`, `rediss://`, `unix:///path.sock?db=N`,
      `redis+sentinel://h1:26379,h2:26380/service/db`: Redis Streams with a consumer
      group; `prefix` namespaces every key (default `jobs:`).
    - `postgresql://user:password@host:5432/db[?schema=S&timeout=S]`: `FOR UPDATE SKIP
      LOCKED` takes, LISTEN/NOTIFY to wake idle workers; the schema is migrated now.
    - `amqp://user:password@host:5672/vhost?prefix=jobs.&prefetch=16&timeout=5s`,
      `amqps://`: RabbitMQ quorum queues with publisher confirms; `prefix` starts every
      queue name (default `jobs.`), `prefetch` caps the deliveries pushed to this
      process before it acks (default 16), `timeout` bounds each broker operation
      (default 5 s). Other query parameters (`heartbeat=`, `name=` ...) go to aio-pika.
    """
    parsed, factory = _backend(url, "job queue", QUEUE_BACKENDS)
    with _named_errors(parsed):
        return await factory(parsed, wall)


def _backend(
    url: str, kind: StoreKind, backends: Mapping[str, Factory]
) -> tuple[StoreUrl, Factory]:
    parsed = StoreUrl.parse(url, kind)
    factory = backends.get(parsed.scheme)
    if factory is None:
        *others, last = [EXAMPLES.get(scheme, f"{scheme}://...") for scheme in backends]
        forms = f"{', '.join(others)} or {last}" if others else last
        raise parsed.error(f"unknown scheme {parsed.scheme!r} (use {forms})")
    return parsed, factory


@contextmanager
def _named_errors(url: StoreUrl) -> Iterator[None]:
    """Turn a backend's or client library's ValueError about the URL (redis-py's
    `?socket_timeout=abc`, say) into one that names the store kind and the redacted URL."""
    try:
        yield
    except ValueError as exc:
        if str(exc).startswith(f"{url.kind} URL "):
            raise
        raise url.error(str(exc)) from None


def postgres_database(url: StoreUrl, unavailable: Unavailable) -> PostgresDatabase:
    """The pool and schema a `postgresql://` URL names; nothing connects yet.

    `?schema=` namespaces the tables (default `checkout_sidecar`); `?timeout=` is the
    statement timeout in seconds; libpq's own parameters (`sslmode=`, `connect_timeout=`,
    `application_name=` ...) pass through. `?prefix=` is not read: a schema is
    PostgreSQL's namespace.
    """
    from proxy.storage.postgres import DEFAULT_SCHEMA, DEFAULT_TIMEOUT, PostgresDatabase

    return PostgresDatabase(
        url.client_url,
        name=url.name,
        unavailable=unavailable,
        schema=url.params.get("schema", DEFAULT_SCHEMA),
        timeout=url.seconds("timeout", DEFAULT_TIMEOUT),
        scrub=url.scrub,
    )


def redis_client(url: StoreUrl, *, decode_responses: bool = False) -> ReplicatedRedis:
    """The client of a Redis store, with the URL's `wait_replicas` and `replica_timeout`.

    On a Sentinel-managed master a write waits by default for every replica in sync,
    and is refused while a failover is in progress: a failover is expected there and
    would otherwise lose what the old master acknowledged last (`proxy.storage.replicas`).
    The rate limit's counters are the exception, since a lost count costs a request or
    two of quota, not money, and they are on every call.
    """
    from proxy.storage.redis import open_client
    from proxy.storage.replicas import ALL_IN_SYNC, DEFAULT_REPLICA_TIMEOUT

    sentinel = url.scheme == "redis+sentinel"
    wait = url.params.get("wait_replicas")
    if wait is None:
        replicas = ALL_IN_SYNC if sentinel and url.kind != "rate limit store" else 0
    elif wait == "all":
        if not sentinel:
            raise url.error(
                "wait_replicas=all needs a redis+sentinel:// URL, whose Sentinels say "
                "which replicas are in sync (give a number here)"
            )
        replicas = ALL_IN_SYNC
    else:
        replicas = url.count("wait_replicas", 0, minimum=0)
    return open_client(
        url.client_url,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        connect_timeout=REDIS_CONNECT_TIMEOUT,
        decode_responses=decode_responses,
        wait_replicas=replicas,
        replica_timeout=url.seconds("replica_timeout", DEFAULT_REPLICA_TIMEOUT),
    )
