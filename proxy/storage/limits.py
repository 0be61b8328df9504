"""Opens the shared rate limit's store from the sidecar's store URL.

Apart from `proxy.storage.open` because it is not one of the durable stores (it
keeps no record worth a backup, only a few numbers that expire): its backends are
Redis, PostgreSQL, and memory:// (one process; for tests and throwaway runs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from proxy.resilience.clock import Clock, monotonic
from proxy.resilience.ratelimit import BucketStore, RateLimitOptions, SharedAnswer, TokenBucket
from proxy.storage.open import POSTGRES_SCHEMES, REDIS_SCHEMES, redis_client
from proxy.storage.url import StoreKind, StoreUrl

KIND: StoreKind = "rate limit store"


class MemoryBuckets:
    """`BucketStore` in this process: the same `TokenBucket`s, shared by name."""

    def __init__(self, clock: Clock = monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def _bucket(self, key: str, options: RateLimitOptions) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None or bucket.options != options:
            fresh = TokenBucket(options, self._clock)
            if bucket is not None:
                fresh.tat = bucket.tat  # new settings keep what was spent
            bucket = self._buckets[key] = fresh
        return bucket

    async def take(self, key: str, options: RateLimitOptions, max_wait: float) -> SharedAnswer:
        bucket = self._bucket(key, options)
        admission = bucket.reserve(max_wait)
        wait = admission.wait if admission.granted else admission.retry_after
        return SharedAnswer(admission.granted, wait, math.floor(bucket.level() * 1000) / 1000)

    async def pause(self, key: str, options: RateLimitOptions, seconds: float) -> None:
        self._bucket(key, options).pause(seconds)

    async def close(self) -> None:
        return None


def _memory(url: StoreUrl) -> BucketStore:
    return MemoryBuckets()


def _redis(url: StoreUrl) -> BucketStore:
    from proxy.storage.limits_redis import DEFAULT_PREFIX, RedisBuckets

    return RedisBuckets(redis_client(url), name=url.name, prefix=url.prefix(DEFAULT_PREFIX))


def _postgres(url: StoreUrl) -> BucketStore:
    from proxy.storage.limits_postgres import PostgresBuckets, unavailable
    from proxy.storage.open import postgres_database

    return PostgresBuckets(postgres_database(url, unavailable))


RATE_LIMIT_BACKENDS: Mapping[str, Callable[[StoreUrl], BucketStore]] = {
    "memory": _memory,
    **dict.fromkeys(REDIS_SCHEMES, _redis),
    **dict.fromkeys(POSTGRES_SCHEMES, _postgres),
}
"""Scheme -> backend; `proxy.config.model.SHARED_LIMIT_SCHEMES` must name the same."""


def open_bucket_store(url: str) -> BucketStore:
    """The shared rate limit's store `url` names; nothing connects until the first call.

    - `redis://[user:password@]host:port/db[?prefix=P]` (`rediss://`, `unix://`): every
      replica shares each upstream's bucket, kept under `P<upstream>` (default
      `ratelimit:`).
    - `postgresql://user:password@host:5432/db[?schema=S]`: every replica shares each
      upstream's bucket, one row of `rate_limits` in the store's schema.
    - `memory://`: buckets of this process only.
    """
    parsed = StoreUrl.parse(url, KIND)
    factory = RATE_LIMIT_BACKENDS.get(parsed.scheme)
    if factory is None:
        problem = (
            f"{parsed.scheme}:// cannot keep a shared rate limit "
            "(use redis://host:port/db or postgresql://user@host:5432/db)"
        )
        raise parsed.error(problem)
    try:
        return factory(parsed)
    except ValueError as exc:
        raise parsed.error(str(exc)) from None
