"""`redis://host:port/db`: idempotency records shared by every sidecar replica.

The claim is `SET NX PX` run in a Lua script that, when the key is taken, also
returns the existing record and its remaining lease in the same atomic step, so
no other replica can slip in between "is it free?" and "take it". Expiry is
Redis's own (PX), which is why this backend takes no clock.

When the checkout journal is on the same Redis (same server and db, and the same hash
tag in both prefixes, which Redis Cluster needs: `prefix={checkout}:idempotency:` with
the journal's `prefix={checkout}:journal:`), the claim also inserts the checkout's first
record in the same script (`claim_joint`, the journal's `JointScript`), and the journal's
final write keeps the key's answer (`joint_complete`). Otherwise the two are separate
writes, as for any two stores.

Outages surface as `IdempotencyStoreUnavailable` quickly (short socket timeouts, one quick
retry), and redis-py's pool drops broken connections, so the store works again
by itself once Redis is back.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from proxy.idempotency.store import (
    ClaimResult,
    IdempotencyStoreUnavailable,
    StoredResponse,
    completed_record,
    in_progress_record,
    result_for_existing,
)
from proxy.storage.joint import JointInsert, JointScript
from proxy.storage.redis import ceil_ms, joint_space, lua_function, unavailable_on_error

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

# KEYS: the claim's key, then the insert's keys. ARGV: the in-progress marker, the lease
# (ms), then the insert's ARGV. The claim is written last: an insert that fails (a
# script error) aborts the script before it, so the key stays free. `insert` (the other
# store's script as a function, `_joint_claim_source`) returns 1 when it added its record.
_CLAIM_JOINT = """
local value = redis.call('GET', KEYS[1])
if value then return {0, value, redis.call('PTTL', KEYS[1])} end
local inserted = insert({unpack(KEYS, 2)}, {unpack(ARGV, 3)})
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, inserted}
"""

# KEYS: the key. ARGV: the completed record, its TTL (ms). For another store's script.
_COMPLETE = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

DEFAULT_PREFIX = "checkout-sidecar:idempotency:"


def _joint_claim_source(insert_body: str) -> str:
    return lua_function("insert", insert_body) + _CLAIM_JOINT


class RedisStore:
    """Records as JSON strings under `prefix + key`, each with its own PX expiry."""

    def __init__(self, client: aioredis.Redis, *, name: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.name = name
        self.prefix = prefix
        self._redis = client
        self._claim_script = client.register_script(_CLAIM)
        self._abandon_script = client.register_script(_ABANDON)
        self._space = joint_space(client, prefix)
        self._joint_scripts: dict[str, AsyncScript] = {}

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
        with unavailable_on_error(self.name, IdempotencyStoreUnavailable):
            await self._redis.set(
                self.prefix + key, _completed(fingerprint, response), px=ceil_ms(ttl)
            )

    async def abandon(self, key: str) -> None:
        with unavailable_on_error(self.name, IdempotencyStoreUnavailable):
            await self._abandon_script(keys=[self.prefix + key])

    # -- the checkout journal's writes in the same script (JointClaims, JointCompletes) --

    def accepts(self, insert: JointInsert) -> bool:
        """`insert` is a Redis script whose keys live where this store's do."""
        return (
            isinstance(insert, JointScript)
            and self._space is not None
            and insert.database == self._space
        )

    async def claim_joint(
        self, key: str, fingerprint: str, in_progress_ttl: float, insert: JointInsert
    ) -> ClaimResult:
        if not self.accepts(insert):
            raise ValueError(f"{insert.database!r} is not this store's Redis")
        assert isinstance(insert, JointScript)
        script = self._joint_scripts.get(insert.script)
        if script is None:  # one per journal script: a handful, registered once
            script = self._redis.register_script(_joint_claim_source(insert.script))
            self._joint_scripts[insert.script] = script
        marker = json.dumps(in_progress_record(fingerprint))
        with unavailable_on_error(self.name, IdempotencyStoreUnavailable):
            reply = await script(
                keys=[self.prefix + key, *insert.keys],
                args=[marker, ceil_ms(in_progress_ttl), *insert.args],
            )
        if int(reply[0]) == 1:
            return dataclasses.replace(ClaimResult.claimed(), joint=int(reply[1]) == 1)
        record: dict[str, Any] = json.loads(reply[1])
        return result_for_existing(record, fingerprint, max(int(reply[2]), 0) / 1000)

    def joint_complete(
        self, key: str, fingerprint: str, response: StoredResponse, ttl: float
    ) -> tuple[JointInsert, ...]:
        if self._space is None:  # shares no script: no journal accepts it
            return ()
        args = (_completed(fingerprint, response), ceil_ms(ttl))
        return (JointScript(self._space, _COMPLETE, args, keys=(self.prefix + key,)),)

    async def close(self) -> None:
        await self._redis.aclose()


def _completed(fingerprint: str, response: StoredResponse) -> str:
    return json.dumps(completed_record(fingerprint, response), separators=(",", ":"))
