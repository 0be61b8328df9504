"""A Redis master found through Redis Sentinel, for every Redis-backed store.

`redis+sentinel://[user:password@]host:26379,host:26380/mymaster/0` names the
Sentinels to ask (default port 26379), the service (`mymaster`) and the database
(`0`, the default). The userinfo is the *master's* credentials (AUTH on the Redis
that holds the data); the Sentinels' own are query parameters, `sentinel_password=`
and `sentinel_username=`, because one URL cannot carry two userinfos. `password=`
and `username=` in the query are the master's too, as in redis-py's own URLs.
`socket_timeout=` and `socket_connect_timeout=` (seconds) apply to both.

The client is redis-py's `Sentinel(...).master_for(service)`: a new connection asks
the Sentinels where the master is, and a command answered READONLY (a demoted
master) drops its connection. That alone leaves a pooled connection talking to the
old master for as long as it stays up, and Sentinel only turns a demoted master into
a replica some seconds after the switch: writes in between would be lost when it
resyncs. So the pool also asks the Sentinels at most every `MASTER_CHECK_INTERVAL`
seconds, on the way to a command, and when the master moved it closes every
connection to the old one (idle ones at once, busy ones when they come back).
A command caught in the switch fails as the store's `StoreUnavailable` (a 503 to the
client, never a request run unprotected), and the next one reaches the new master.
The same check also counts the master's replicas in sync and notes whether the
Sentinels report a failover in progress, for the writes that wait for the replicas
(`proxy.storage.replicas`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from proxy.storage.replicas import ALL_IN_SYNC, ReplicatedRedis, replicas_in_sync

log = logging.getLogger("proxy.storage")

SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
MASTER_CHECK_INTERVAL = 0.5
"""Seconds between two questions to the Sentinels about where the master is: how long
writes may still reach a demoted master after Sentinel switched (plus one round trip)."""

CLIENT_PARAMETERS = frozenset(
    {
        "password",
        "username",
        "sentinel_password",
        "sentinel_username",
        "socket_timeout",
        "socket_connect_timeout",
    }
)
"""What a Sentinel URL's query may hold besides the stores' own parameters."""


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A `redis+sentinel://` URL taken apart; the passwords are left out of `repr`."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    socket_timeout: float | None = None
    socket_connect_timeout: float | None = None

    @classmethod
    def parse(cls, client_url: str) -> SentinelTarget:
        """Read a URL without the stores' own parameters (`StoreUrl.client_url`).

        Errors are ValueErrors without the password; the opener adds the store kind
        and the redacted URL.
        """
        form = f"(use {SCHEME}://[user:password@]host:26379,host:26380/service/db)"
        _, _, rest = client_url.partition("://")
        rest, _, query = rest.partition("?")
        authority, slash, path = rest.partition("/")
        userinfo, at, hosts = authority.rpartition("@")
        # as redis-py reads a userinfo: `user:password`, `:password`, or a bare `user`
        user, _, secret = userinfo.partition(":") if at else ("", "", "")
        username, password = unquote(user) or None, unquote(secret) or None
        sentinels = tuple(_address(host, form) for host in hosts.split(",") if host)
        if not sentinels:
            raise ValueError(f"names no Sentinel {form}")
        service, _, db_text = path.partition("/") if slash else ("", "", "")
        service = unquote(service)
        if not service:
            raise ValueError(f"names no service {form}")
        db_text = db_text.strip("/") or "0"
        if not db_text.isdigit():
            raise ValueError(f"database {db_text!r} is not a number {form}")
        options: dict[str, str] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key not in CLIENT_PARAMETERS:
                known = ", ".join(sorted(CLIENT_PARAMETERS))
                raise ValueError(f"unknown parameter {key!r} (a Sentinel URL takes {known})")
            options.setdefault(key, value)
        return cls(
            sentinels=sentinels,
            service=service,
            db=int(db_text),
            username=options.get("username") or username,
            password=options.get("password") or password,
            sentinel_username=options.get("sentinel_username") or None,
            sentinel_password=options.get("sentinel_password") or None,
            socket_timeout=_seconds(options, "socket_timeout"),
            socket_connect_timeout=_seconds(options, "socket_connect_timeout"),
        )


def _address(text: str, form: str) -> tuple[str, int]:
    """`host`, `host:port` or `[v6]:port` as (host, port)."""
    try:
        parts = urlsplit(f"//{text}")
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError(f"Sentinel address {text!r} is malformed {form}") from None
    if not host:
        raise ValueError(f"Sentinel address {text!r} names no host {form}")
    return host, port or DEFAULT_SENTINEL_PORT


def _seconds(options: dict[str, str], key: str) -> float | None:
    text = options.get(key)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{key}={text!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{key} must be positive, got {text!r}")
    return value


class FollowingSentinel(Sentinel):
    """redis-py's Sentinel manager, which also remembers whether the Sentinel it asked
    about a service last reported a failover of it in progress."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failing_over: dict[str, bool] = {}

    def check_master_state(self, state: dict[str, Any], service_name: str) -> bool:
        flags = state.get("flags") or ""
        names = flags if isinstance(flags, set | frozenset) else set(str(flags).split(","))
        self.failing_over[service_name] = "failover_in_progress" in names
        return bool(super().check_master_state(state, service_name))


class FollowingMasterPool(SentinelConnectionPool):
    """redis-py's Sentinel pool, which also notices a switch of master without waiting
    for a new connection: see the module docstring."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)
        self._next_check = 0.0
        self._checking = False
        self.replicas_in_sync: int | None = None
        """The master's replicas in sync when last asked; None: not asked yet."""
        self.failing_over = False
        """Whether the Sentinels reported a failover of the master in progress when last
        asked: its writes are refused until it ends."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        await self.follow_master()
        return await super().get_connection(*args, **kwargs)

    async def release(self, connection: Any) -> None:
        """A connection that comes back from a master that is no longer the master is
        closed first, so the next command on it connects to the new one. (redis-py's
        own pool notices only idle connections, and only when it learns of the switch
        itself; a connection busy at that moment would keep the old master.)"""
        master = self.master_address
        if master is not None and (connection.host, connection.port) != master:
            await connection.disconnect()
        await super().release(connection)

    async def follow_master(self) -> None:
        """Ask where the master is, how many replicas it has in sync and whether it is
        failing over, unless that was asked less than MASTER_CHECK_INTERVAL ago."""
        now = time.monotonic()
        if self._checking or now < self._next_check:
            return
        self._checking = True
        self._next_check = now + MASTER_CHECK_INTERVAL
        was = (self.master_address, self.replicas_in_sync, self.failing_over)
        try:
            # The master's replicas first, the Sentinels' word on a failover after: a
            # count that already misses a replica being promoted then always comes
            # with the failover that promotes it (`proxy.storage.replicas`).
            counted = await self._count_replicas_in_sync()
            if counted is not None:  # the master did not answer: the last count stands
                self.replicas_in_sync = counted
            known = self.master_address
            # redis-py's own step: asks the Sentinels, closes idle connections if it moved
            await self.get_master_address()
            manager = self.sentinel_manager
            if isinstance(manager, FollowingSentinel):
                self.failing_over = manager.failing_over.get(self.service_name, False)
            if known is not None and self.master_address != known:
                # the count was the old master's: the new one's replicas, at once, and
                # unknown (writes refused, `SentinelMasterClient`) if it does not answer
                self.replicas_in_sync = await self._count_replicas_in_sync()
        except (RedisError, OSError):
            # No Sentinel answered: keep the master we know. A command that cannot
            # reach it fails by itself, and a new connection asks the Sentinels again.
            pass
        finally:
            self._checking = False
        now_seen = (self.master_address, self.replicas_in_sync, self.failing_over)
        if now_seen != was:
            # what the writes wait for changed: said once per change, for the SRE
            # reading a failover afterwards (and the tests that replay one)
            log.info(
                "redis %s: master %s, %s replica(s) in sync%s",
                self.service_name,
                _shown(self.master_address),
                "?" if self.replicas_in_sync is None else self.replicas_in_sync,
                ", failover in progress (writes refused)" if self.failing_over else "",
            )

    async def _count_replicas_in_sync(self) -> int | None:
        """The master's replicas that are in sync, as the master itself says
        (`replicas_in_sync`); None when it did not answer: keep the last count.

        Asked on a connection of the pool's own, past our `get_connection` (which is
        what called this). Not the Sentinels: they learn of replicas from the master's
        INFO every 10 s, and a write waited for fewer than the master has may miss the
        one they promote.
        """
        try:
            connection = await super().get_connection()
        except (RedisError, OSError):
            return None
        try:
            await connection.send_command("INFO", "replication")
            info = await connection.read_response()
        except (RedisError, OSError):
            await connection.disconnect()
            return None
        finally:
            await self.release(connection)
        return replicas_in_sync(info.decode() if isinstance(info, bytes) else str(info))


def _shown(address: Any) -> str:
    return "unknown" if address is None else f"{address[0]}:{address[1]}"


class SentinelMasterClient(ReplicatedRedis):
    """The master's client; closing it also closes its connections to the Sentinels,
    which redis-py leaves to the caller."""

    def replicas_in_sync(self) -> int | None:
        pool = self.connection_pool
        return pool.replicas_in_sync if isinstance(pool, FollowingMasterPool) else None

    async def write_refusal(self) -> str | None:
        pool = self.connection_pool
        if not isinstance(pool, FollowingMasterPool):
            return None
        # a refused write takes no connection, so it asks here (at most every
        # MASTER_CHECK_INTERVAL), or it would never learn that the failover ended
        await pool.follow_master()
        if pool.failing_over:
            return "the Sentinels report a failover of the master in progress"
        if self.replicas == ALL_IN_SYNC and pool.replicas_in_sync is None:
            # waiting for none of them could acknowledge a write that the replica
            # promoted next lacks: a write is refused until the master has said
            return "the master's replicas in sync are not known yet (INFO did not answer)"
        return None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        pool = self.connection_pool
        try:
            await super().aclose(close_connection_pool)
        finally:
            manager = getattr(pool, "sentinel_manager", None)
            if isinstance(manager, Sentinel):
                await manager.aclose()


def open_sentinel_client(
    target: SentinelTarget,
    *,
    socket_timeout: float,
    connect_timeout: float,
    retry: Retry,
    decode_responses: bool = False,
) -> SentinelMasterClient:
    """The master's client; nothing connects until the first command.

    The URL's `socket_timeout=` and `socket_connect_timeout=` override the timeouts
    given here, for the Sentinels and the master alike: both must answer promptly
    for an outage or a failover to be reported at once rather than after the
    client's default of no timeout at all.
    """
    timeouts = {
        "socket_timeout": target.socket_timeout or socket_timeout,
        "socket_connect_timeout": target.socket_connect_timeout or connect_timeout,
    }
    sentinel = FollowingSentinel(
        list(target.sentinels),
        sentinel_kwargs={
            **timeouts,
            "username": target.sentinel_username,
            "password": target.sentinel_password,
            # a Sentinel that went away is replaced by the next one in the list
            "retry": Retry(ExponentialBackoff(cap=0.05, base=0.01), 0),
        },
    )
    client: SentinelMasterClient = sentinel.master_for(
        target.service,
        redis_class=SentinelMasterClient,
        connection_pool_class=FollowingMasterPool,
        db=target.db,
        username=target.username,
        password=target.password,
        decode_responses=decode_responses,
        retry=retry,
        health_check_interval=30,
        **timeouts,
    )
    return client
