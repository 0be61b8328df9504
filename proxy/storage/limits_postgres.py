"""The shared rate limit in PostgreSQL: one GCRA bucket per upstream, one row each.

The same arithmetic as `proxy.storage.limits_redis` (and `TokenBucket` in
`proxy.resilience.ratelimit`), in whole microseconds of the database server's clock
(`clock_timestamp()`), so the replicas' clocks never matter. A take is one statement
in one transaction: the row is created if missing, locked by `SELECT ... FOR UPDATE`,
and its theoretical arrival time moved on when the token is granted, so two replicas asking
at once are served one after the other. A deployment whose state lives in
PostgreSQL needs no Redis for `scope: shared`.
"""

from __future__ import annotations

import math

from proxy.resilience.ratelimit import (
    BucketStoreUnavailable,
    RateLimitOptions,
    SharedAnswer,
)
from proxy.storage.postgres import PostgresDatabase

_NOW = "(extract(epoch from clock_timestamp()) * 1000000)::bigint"

_CREATE = """
INSERT INTO {schema}.rate_limits (key, tat) VALUES (%(key)s, 0) ON CONFLICT (key) DO NOTHING
"""
"""First, so the bucket's row exists and the take below can lock it: two replicas asking
at once are then served one after the other, even for a bucket's first token."""

_TAKE = f"""
WITH current AS (
    SELECT greatest(b.tat, now.t) AS tat, now.t AS t
    FROM {{schema}}.rate_limits b, (SELECT {_NOW} AS t) now
    WHERE b.key = %(key)s
    FOR UPDATE OF b
),
granted AS (
    SELECT tat, t, wait, (wait = 0 OR wait < %(max_wait)s) AS ok
    FROM (SELECT tat, t, greatest(tat + %(interval)s - %(tolerance)s - t, 0) AS wait
          FROM current) decision
),
written AS (
    UPDATE {{schema}}.rate_limits SET tat = granted.tat + %(interval)s
    FROM granted WHERE key = %(key)s AND granted.ok
    RETURNING {{schema}}.rate_limits.tat
)
SELECT ok, wait, coalesce((SELECT tat FROM written), tat) - t FROM granted
"""
"""Granted or not, the wait (µs; the retry-after when refused), and how far the bucket's
arrival time is ahead of now (µs), from which the tokens left follow."""

_PAUSE = f"""
INSERT INTO {{schema}}.rate_limits (key, tat)
VALUES (%(key)s, {_NOW} + %(pause)s + %(tolerance)s - %(interval)s)
ON CONFLICT (key) DO UPDATE SET tat = greatest({{schema}}.rate_limits.tat, excluded.tat)
"""
"""The first token after the pause comes when it ends, then the bucket refills from empty."""


def _micros(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1_000_000))


class PostgresBuckets:
    """`BucketStore` in PostgreSQL; the upstream's name is each bucket's key."""

    def __init__(self, database: PostgresDatabase) -> None:
        self.database = database
        self.name = database.name
        self._create = database.sql(_CREATE)
        self._take = database.sql(_TAKE)
        self._pause = database.sql(_PAUSE)

    async def take(self, key: str, options: RateLimitOptions, max_wait: float) -> SharedAnswer:
        interval = _micros(options.interval)
        tolerance = interval * options.burst
        params = {
            "key": key,
            "interval": interval,
            "tolerance": tolerance,
            "max_wait": _micros(max_wait) if max_wait > 0 else 0,
        }
        async with self.database.transaction() as conn:
            await conn.execute(self._create, params)
            cursor = await conn.execute(self._take, params)
            row = await cursor.fetchone()
        assert row is not None  # the query always yields one row
        granted, wait, ahead = bool(row[0]), int(row[1]), int(row[2])
        level = max(0.0, (tolerance - ahead) / interval)
        return SharedAnswer(granted, wait / 1e6, math.floor(level * 1000) / 1000)

    async def pause(self, key: str, options: RateLimitOptions, seconds: float) -> None:
        interval = _micros(options.interval)
        params = {
            "key": key,
            "interval": interval,
            "tolerance": interval * options.burst,
            "pause": _micros(seconds),
        }
        async with self.database.transaction() as conn:
            await conn.execute(self._pause, params)

    async def close(self) -> None:
        await self.database.close()


def unavailable(name: str, detail: str) -> Exception:
    return BucketStoreUnavailable(f"{name}: {detail}")
