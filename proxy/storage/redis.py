"""Redis as every Redis-backed store reaches it: a client from the store's URL
(`redis://`, `rediss://`, `unix://` or `redis+sentinel://`, without our own
parameters: see `proxy.storage.url`), Redis failures reported as the store's own
error, and whether the server keeps its data over a restart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, ResponseError


def ceil_ms(seconds: float) -> int:
    """Seconds as whole milliseconds, at least 1, for Redis PX and PEXPIRE."""
    return max(1, math.ceil(seconds * 1000))


def prompt_retry() -> Retry:
    """One fast retry: enough to replace a connection the server closed while it sat in
    the pool (or one to a master that Sentinel demoted), short enough that an outage is
    reported promptly."""
    return Retry(ExponentialBackoff(cap=0.05, base=0.01), 1)


def open_client(
    client_url: str,
    *,
    socket_timeout: float,
    connect_timeout: float,
    decode_responses: bool = False,
) -> aioredis.Redis:
    """A client that reports an outage promptly; nothing connects until the first command.

    Parameters in the URL (`socket_timeout=` ...) override the timeouts given here.
    redis-py's pool drops broken connections, so the client works again by itself
    once Redis is back. A `redis+sentinel://` URL gives the client of the master its
    Sentinels name (`proxy.storage.sentinel`), which follows a failover.
    """
    if client_url.lower().startswith("redis+sentinel://"):
        from proxy.storage.sentinel import SentinelTarget, open_sentinel_client

        return open_sentinel_client(
            SentinelTarget.parse(client_url),
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            retry=prompt_retry(),
            decode_responses=decode_responses,
        )
    return aioredis.Redis.from_url(
        client_url,
        decode_responses=decode_responses,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=prompt_retry(),
        health_check_interval=30,
    )


@contextmanager
def unavailable_on_error(name: str, unavailable: Callable[[str, str], Exception]) -> Iterator[None]:
    """Raise `unavailable(name, detail)` for a Redis or socket error inside the block."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise unavailable(name, f"{type(exc).__name__}: {exc}") from exc


async def persistence(client: aioredis.Redis) -> tuple[bool | None, str]:
    """Whether the server keeps its data over a restart, and the settings that say so.

    Durable when an append-only file is written (`appendonly yes`) or snapshots are
    scheduled (`save` not empty); otherwise a restart starts empty. `None` when the
    server refuses `CONFIG GET` (renamed or denied by an ACL on managed Redis): then
    nobody here can tell. `client` decodes responses; connection errors are raised.
    """
    try:
        settings = {**await client.config_get("appendonly"), **await client.config_get("save")}
    except ResponseError as exc:  # unknown command (renamed), NOPERM (ACL)
        return None, f"CONFIG GET refused ({exc})"
    aof = str(settings.get("appendonly") or "").lower()
    snapshots = str(settings.get("save") or "").strip()
    return aof == "yes" or bool(snapshots), f"appendonly {aof or '?'}, save {snapshots!r}"


async def failover_caveat(client: aioredis.Redis) -> str:
    """Why a Sentinel-managed master may lose acknowledged writes in a failover, or "".

    Replication is asynchronous: while Sentinel promotes a replica the old master still
    takes writes, which its demotion then discards, unless it refuses writes once its
    replicas are gone (`min-replicas-to-write` >= 1). Unknown (CONFIG refused) is "".
    """
    try:
        settings = await client.config_get("min-replicas-to-write")
    except ResponseError:
        return ""
    if str(settings.get("min-replicas-to-write") or "0") != "0":
        return ""
    return (
        "min-replicas-to-write is 0, so writes the old master acknowledges while Sentinel "
        "promotes a replica are lost in a failover (set min-replicas-to-write 1)"
    )
