"""Redis as every Redis-backed store reaches it: a client from the store's URL
(`redis://`, `rediss://` or `unix://`, without our own parameters: see
`proxy.storage.url`), and Redis failures reported as the store's own error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError


def ceil_ms(seconds: float) -> int:
    """Seconds as whole milliseconds, at least 1, for Redis PX and PEXPIRE."""
    return max(1, math.ceil(seconds * 1000))


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
    once Redis is back.
    """
    return aioredis.Redis.from_url(
        client_url,
        decode_responses=decode_responses,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        # One fast retry: enough to replace a connection the server closed while it
        # sat in the pool, short enough that an outage is reported promptly.
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
        health_check_interval=30,
    )


@contextmanager
def unavailable_on_error(name: str, unavailable: Callable[[str, str], Exception]) -> Iterator[None]:
    """Raise `unavailable(name, detail)` for a Redis or socket error inside the block."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise unavailable(name, f"{type(exc).__name__}: {exc}") from exc
