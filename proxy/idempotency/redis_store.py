"""`redis://host:port/db`: idempotency records shared by every sidecar replica.

The claim is `SET NX PX` run in a Lua script that, when the key is taken, also
returns the existing record and its remaining lease in the same atomic step, so
no other replica can slip in between "is it free?" and "take it". Expiry is
Redis's own (PX), which is why this backend takes no clock.

Outages surface as `StoreUnavailable` quickly (short socket timeouts, one quick
retry), and redis-py's pool drops broken connections, so the store works again
by itself once Redis is back.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from proxy.idempotency.store import (
    ClaimResult,
    StoredResponse,
    StoreUnavailable,
    ceil_ms,
    completed_record,
    in_progress_record,
    redact_url,
    result_for_existing,
)

_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {1}
end
return {0, redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""

_ABANDON = """
local value = redis.call('GET', KEYS[1])
if value and cjson.decode(value)['state'] == 'in_progress' then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

DEFAULT_PREFIX = "checkout-sidecar:idempotency:"


def _split_prefix(url: str) -> tuple[str, str]:
    """Take our own `prefix` query parameter out before redis-py parses the URL."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((value for name, value in query if name == "prefix"), DEFAULT_PREFIX)
    rest = urlencode([(name, value) for name, value in query if name != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


class RedisStore:
    """Records as JSON strings under `prefix + key`, each with its own PX expiry."""

    def __init__(self, client: aioredis.Redis, *, name: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.name = name
        self.prefix = prefix
        self._redis = client
        self._claim_script = client.register_script(_CLAIM)
        self._abandon_script = client.register_script(_ABANDON)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        socket_timeout: float = 2.0,
        connect_timeout: float = 1.0,
    ) -> RedisStore:
        redis_url, prefix = _split_prefix(url)
        client = aioredis.Redis.from_url(
            redis_url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            # One fast retry: enough to replace a connection the server closed while it
            # sat in the pool, short enough that an outage answers 503 promptly.
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
            health_check_interval=30,
        )
        return cls(client, name=redact_url(url), prefix=prefix)

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(self.name, f"{type(exc).__name__}: {exc}")

    async def claim(self, key: str, fingerprint: str, in_progress_ttl: float) -> ClaimResult:
        marker = json.dumps(in_progress_record(fingerprint))
        try:
            reply = await self._claim_script(
                keys=[self.prefix + key], args=[marker, ceil_ms(in_progress_ttl)]
            )
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        if int(reply[0]) == 1:
            return ClaimResult.claimed()
        record: dict[str, Any] = json.loads(reply[1])
        remaining_ms = int(reply[2])
        return result_for_existing(record, fingerprint, max(remaining_ms, 0) / 1000)

    async def complete(
        self, key: str, fingerprint: str, response: StoredResponse, ttl: float
    ) -> None:
        value = json.dumps(completed_record(fingerprint, response), separators=(",", ":"))
        try:
            await self._redis.set(self.prefix + key, value, px=ceil_ms(ttl))
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    async def abandon(self, key: str) -> None:
        try:
            await self._abandon_script(keys=[self.prefix + key])
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc

    async def close(self) -> None:
        await self._redis.aclose()
