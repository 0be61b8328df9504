"""`redis://host:port/db`: idempotency records shared by every sidecar replica.

The claim is `SET NX PX` run in a Lua script that, when the key is taken, also
returns the existing record and its remaining lease in the same atomic step, so
no other replica can slip in between "is it free?" and "take it". Expiry is
Redis's own (PX), which is why this backend takes no clock.

Outages surface as `IdempotencyStoreUnavailable` quickly (short socket timeouts, one quick
retry), and redis-py's pool drops broken connections, so the store works again
by itself once Redis is back.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis

from proxy.idempotency.store import (
    ClaimResult,
    IdempotencyStoreUnavailable,
    StoredResponse,
    completed_record,
    in_progress_record,
    result_for_existing,
)
from proxy.storage.redis import ceil_ms, unavailable_on_error

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


class RedisStore:
    """Records as JSON strings under `prefix + key`, each with its own PX expiry."""

    def __init__(self, client: aioredis.Redis, *, name: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.name = name
        self.prefix = prefix
        self._redis = client
        self._claim_script = client.register_script(_CLAIM)
        self._abandon_script = client.register_script(_ABANDON)

    async def claim(self, key: str, fingerprint: str, in_progress_ttl: float) -> ClaimResult:
        marker = json.dumps(in_progress_record(fingerprint))
        with unavailable_on_error(self.name, IdempotencyStoreUnavailable):
            reply = await self._claim_script(
                keys=[self.prefix + key], args=[marker, ceil_ms(in_progress_ttl)]
            )
        if int(reply[0]) == 1:
            return ClaimResult.claimed()
        record: dict[str, Any] = json.loads(reply[1])
        remaining_ms = int(reply[2])
        return result_for_existing(record, fingerprint, max(remaining_ms, 0) / 1000)

    async def complete(
        self, key: str, fingerprint: str, response: StoredResponse, ttl: float
    ) -> None:
        value = json.dumps(completed_record(fingerprint, response), separators=(",", ":"))
        with unavailable_on_error(self.name, IdempotencyStoreUnavailable):
            await self._redis.set(self.prefix + key, value, px=ceil_ms(ttl))

    async def abandon(self, key: str) -> None:
        with unavailable_on_error(self.name, IdempotencyStoreUnavailable):
            await self._abandon_script(keys=[self.prefix + key])

    async def close(self) -> None:
        await self._redis.aclose()
