"""Redis as every Redis-backed store reaches it: a client from the store's URL, keys
under the URL's `prefix`, and Redis failures reported as the store's own error.

A store URL carries parameters of ours (`prefix`, the journal's `ttl`) beside
redis-py's (`socket_timeout` ...); ours are taken out before redis-py parses the
rest. The URL is redacted before it becomes the store's `name`, because it may carry
a password.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from proxy.storeurl import redact_url


@dataclass(frozen=True, slots=True)
class RedisUrl:
    """A store's `redis://` URL taken apart."""

    client_url: str
    """The URL without our own parameters, for redis-py."""
    name: str
    """The URL with secrets removed, for error bodies and logs."""
    prefix: str
    """What every key of the store starts with."""

    @classmethod
    def parse(cls, url: str, *, default_prefix: str, own: Collection[str] = ()) -> RedisUrl:
        """Take `prefix` (and the store's other `own` parameters) out of the query; the
        first of a repeated parameter counts, as redis-py reads its own."""
        parts = urlsplit(url)
        prefix: str | None = None
        rest: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key == "prefix":
                prefix = value if prefix is None else prefix
            elif key not in own:
                rest.append((key, value))
        return cls(
            client_url=urlunsplit(parts._replace(query=urlencode(rest))),
            name=redact_url(url),
            prefix=default_prefix if prefix is None else prefix,
        )


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
