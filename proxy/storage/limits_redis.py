"""The shared rate limit in Redis: one GCRA bucket per upstream, one key each.

Each `take` and `pause` is one Lua script, so a read-modify-write of the bucket is
atomic however many replicas ask at once, and costs one round trip. Time is the
Redis server's own (`TIME`), so the replicas' clocks never matter. The script is
`TokenBucket.reserve` and `TokenBucket.pause` of `proxy.resilience.ratelimit` in
whole microseconds (Lua numbers are doubles: integers stay exact up to 2^53, and
`%d` keeps all of a timestamp's digits where `tostring` would round it). The key
expires when the bucket is full again, so an idle upstream leaves nothing behind.
"""

from __future__ import annotations

import math

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from proxy.resilience.ratelimit import (
    BucketStoreUnavailable,
    RateLimitOptions,
    SharedAnswer,
)
from proxy.storage.redis import unavailable_on_error

DEFAULT_PREFIX = "ratelimit:"

_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat + interval - tolerance - now
if wait < 0 then wait = 0 end
local granted = 0
if wait == 0 or wait < max_wait then
  granted = 1
  tat = tat + interval
  redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
end
local level = math.floor((tolerance - (tat - now)) * 1000 / interval)
if level < 0 then level = 0 end
return {granted, wait, level}
"""
"""KEYS[1] the bucket; ARGV interval, tolerance, max_wait in µs. Returns granted (0/1),
the wait (µs; the retry-after when refused) and the tokens left (in thousandths)."""

_PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local paused = now + tonumber(ARGV[3]) + tolerance - interval
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if paused > tat then
  local ttl = math.ceil((paused - now) / 1000) + 1
  redis.call('SET', KEYS[1], string.format('%d', paused), 'PX', ttl)
end
return 1
"""
"""KEYS[1] the bucket; ARGV interval, tolerance, pause in µs: the first token after the
pause comes when it ends, then the bucket refills from empty."""


def _micros(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1_000_000))


class RedisBuckets:
    """`BucketStore` on Redis; `prefix` + the upstream's name is each bucket's key."""

    def __init__(self, client: aioredis.Redis, *, name: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.name = name
        self.prefix = prefix
        self._take: AsyncScript = client.register_script(_TAKE)
        self._pause: AsyncScript = client.register_script(_PAUSE)

    async def take(self, key: str, options: RateLimitOptions, max_wait: float) -> SharedAnswer:
        interval = _micros(options.interval)
        args = (interval, interval * options.burst, _micros(max_wait) if max_wait > 0 else 0)
        with unavailable_on_error(self.name, _unavailable):
            granted, wait, level = await self._take(keys=[self.prefix + key], args=args)
        return SharedAnswer(bool(granted), int(wait) / 1e6, int(level) / 1000)

    async def pause(self, key: str, options: RateLimitOptions, seconds: float) -> None:
        interval = _micros(options.interval)
        args = (interval, interval * options.burst, _micros(seconds))
        with unavailable_on_error(self.name, _unavailable):
            await self._pause(keys=[self.prefix + key], args=args)

    async def close(self) -> None:
        await self.client.aclose()


def _unavailable(name: str, detail: str) -> Exception:
    return BucketStoreUnavailable(f"{name}: {detail}")
