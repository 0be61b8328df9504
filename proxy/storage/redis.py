"""Redis as every Redis-backed store reaches it: a client from the store's URL
(`redis://`, `rediss://`, `unix://` or `redis+sentinel://`, without our own
parameters: see `proxy.storage.url`), Redis failures reported as the store's own
error, whether the server keeps its data over a restart, and where two stores' keys
must live for one script to write both (`joint_space`, `lua_function`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, ResponseError

from proxy.storage.replicas import DEFAULT_REPLICA_TIMEOUT, ReplicatedRedis


def ceil_ms(seconds: float) -> int:
    """Seconds as whole milliseconds, at least 1, for Redis PX and PEXPIRE."""
    return max(1, math.ceil(seconds * 1000))


def server_of(client: aioredis.Redis) -> str:
    """Which server and database `client`'s commands reach: host, port (or socket) and db.

    Two stores whose clients reach the same one can write each other's keys in one
    script; credentials, timeouts and TLS do not matter. A Sentinel-managed master is
    named by its service and its Sentinels, since its address changes in a failover.
    """
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    db = kwargs.get("db") or 0
    service = getattr(pool, "service_name", None)
    if service is not None:
        sentinels = sorted(
            "{host}:{port}".format(**sentinel.connection_pool.connection_kwargs)
            for sentinel in pool.sentinel_manager.sentinels  # type: ignore[attr-defined]
        )
        return f"redis+sentinel://{','.join(sentinels)}/{service}/{db}"
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={db}"
    return f"redis://{kwargs.get('host') or 'localhost'}:{kwargs.get('port') or 6379}/{db}"


def hash_tag(prefix: str) -> str | None:
    """The Redis Cluster hash tag that every key starting with `prefix` hashes by.

    "" when the prefix has none (`{}` counts as none: Redis then hashes the whole key),
    None when it opens a tag it does not close, so the tag depends on the rest of each
    key and no two stores can be sure to share a slot.
    """
    start = prefix.find("{")
    if start < 0:
        return ""
    end = prefix.find("}", start + 1)
    if end < 0:
        return None
    return prefix[start + 1 : end]


def joint_space(client: aioredis.Redis, prefix: str) -> str | None:
    """Where keys under `prefix` live, for deciding whether two stores share a script.

    Equal for two stores exactly when one script may write both's keys: the same server
    and db, and the same hash tag, so that in Redis Cluster every key is in one slot
    (a prefix such as `{checkout}:journal:` and `{checkout}:idempotency:`). None when
    the prefix's tag is unterminated: such a store shares no script.
    """
    tag = hash_tag(prefix)
    return None if tag is None else f"{server_of(client)}#{{{tag}}}"


def lua_function(name: str, body: str) -> str:
    """The script `body` as a local Lua function `name(KEYS, ARGV)`.

    Its parameters shadow the globals, so a script written to run alone runs unchanged
    inside another with the slices of KEYS and ARGV it was given; its `return` becomes
    the function's result.
    """
    return f"local function {name}(KEYS, ARGV)\n{body}\nend\n"


def sequence_source(bodies: Sequence[str]) -> str:
    """One script running each of `bodies` in turn, on its own slice of KEYS and ARGV,
    and returning the first one's result: several stores' writes as one atomic step.

    Its ARGV starts with two counts per body (keys, arguments); `sequence_call` lays
    the keys and arguments out so.
    """
    names = [f"part{i}" for i in range(1, len(bodies) + 1)]
    parts = "".join(lua_function(name, body) for name, body in zip(names, bodies, strict=True))
    return (
        parts
        + f"local parts = {{{', '.join(names)}}}\n"
        + """
local key_at, arg_at, first = 1, 2 * #parts + 1, nil
for i, part in ipairs(parts) do
  local keys, args = {}, {}
  for j = 1, tonumber(ARGV[2 * i - 1]) do keys[j] = KEYS[key_at]; key_at = key_at + 1 end
  for j = 1, tonumber(ARGV[2 * i]) do args[j] = ARGV[arg_at]; arg_at = arg_at + 1 end
  local result = part(keys, args)
  if i == 1 then first = result end
end
return first
"""
    )


def sequence_call(
    parts: Sequence[tuple[Sequence[str], Sequence[Any]]],
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV for `sequence_source`'s script, from each body's keys and args."""
    keys: list[str] = []
    counts: list[Any] = []
    args: list[Any] = []
    for part_keys, part_args in parts:
        keys += part_keys
        args += part_args
        counts += [len(part_keys), len(part_args)]
    return keys, counts + args


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
    wait_replicas: int = 0,
    replica_timeout: float = DEFAULT_REPLICA_TIMEOUT,
) -> ReplicatedRedis:
    """A client that reports an outage promptly; nothing connects until the first command.

    Parameters in the URL (`socket_timeout=` ...) override the timeouts given here.
    redis-py's pool drops broken connections, so the client works again by itself
    once Redis is back. A `redis+sentinel://` URL gives the client of the master its
    Sentinels name (`proxy.storage.sentinel`), which follows a failover. With
    `wait_replicas`, a write counts only once that many replicas have it
    (`proxy.storage.replicas`).
    """
    client: ReplicatedRedis
    if client_url.lower().startswith("redis+sentinel://"):
        from proxy.storage.sentinel import SentinelTarget, open_sentinel_client

        client = open_sentinel_client(
            SentinelTarget.parse(client_url),
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            retry=prompt_retry(),
            decode_responses=decode_responses,
        )
    else:
        made = ReplicatedRedis.from_url(
            client_url,
            decode_responses=decode_responses,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            retry=prompt_retry(),
            health_check_interval=30,
        )
        assert isinstance(made, ReplicatedRedis)  # it builds `cls`; its hint names the base
        client = made
    client.wait_for_replicas(wait_replicas, replica_timeout)
    return client


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
