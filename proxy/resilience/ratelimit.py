"""Rate limits under a provider's quota: a GCRA token bucket, local or shared.

A provider that allows 100 calls a second answers 429 past that, and every 429 is a
call the checkout waited for in vain. So the sidecar keeps under the quota itself,
per attempt (a retry spends a token like a first attempt): a call over the limit
waits for its token when the wait fits its deadline, and is refused at once
otherwise, without reaching the upstream.

The bucket is GCRA (the generic cell rate algorithm): one number, the "theoretical
arrival time" (`tat`) of the next token, instead of a token count and a refill
time. A token is granted when `tat + interval - tolerance <= now`, where `interval`
is `1 / rate` and `tolerance` is `burst * interval`; granting moves `tat` on by one
interval. A grant that must wait is a *reservation*: `tat` moves on at once, so
callers waiting in line never claim the same token and the granted rate over any
interval `t` is at most `burst + rate * t`. One number is also what makes the shared
form cheap: a Redis script reads and writes one key (`proxy.storage.limits_redis`).

An upstream's own 429 with Retry-After pauses the bucket: `tat` is pushed so that
the first token after the pause comes when the provider asked and the bucket then
refills from empty, so the sidecar does not answer "slow down" with a burst.

`TokenBucket` is the pure arithmetic, on any clock (tests use `FakeClock`).
`LocalLimiter` is it for one process; `SharedLimiter` keeps the same state in a
`BucketStore` (Redis today) so every replica shares one limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass
from typing import Literal, Protocol

from proxy.resilience.clock import Clock, monotonic

PAUSE_WRITE_TIMEOUT = 0.5
"""Seconds a 429's answer may wait to tell the shared store about the pause."""

Scope = Literal["local", "shared"]
StoreDownAction = Literal["refuse", "allow"]


@dataclass(frozen=True, slots=True)
class RateLimitOptions:
    """`rate` tokens a second, at most `burst` at once; plain data, compared on reload."""

    rate: float
    burst: int = 1
    scope: Scope = "local"
    on_store_down: StoreDownAction = "refuse"

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be greater than 0, got {self.rate}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {self.burst}")

    @property
    def interval(self) -> float:
        """Seconds between two tokens at the steady rate."""
        return 1.0 / self.rate

    @property
    def tolerance(self) -> float:
        """How far ahead of now `tat` may run: `burst` intervals."""
        return self.burst * self.interval


@dataclass(frozen=True, slots=True)
class Admission:
    """The limiter's answer for one attempt.

    `granted` with `wait` seconds to sleep before sending (0 for a token at hand), or
    refused, with `retry_after`, the seconds until a token would be free. A refusal
    because the shared store could not be asked has `store_down` set.
    """

    granted: bool
    wait: float = 0.0
    retry_after: float = 0.0
    store_down: bool = False
    detail: str = ""


_ROUNDING = 1e-9
"""Seconds of float error forgiven: `3 * 0.1` is a hair over `0.3`, and a full burst
must pass at once however the clock's value rounds."""

GRANTED_NOW = Admission(True)
"""The usual answer: one frozen value rather than one per call."""


class TokenBucket:
    """The GCRA arithmetic on a clock; not thread-safe, used from one event loop."""

    __slots__ = ("_clock", "_interval", "_tolerance", "options", "tat")

    def __init__(self, options: RateLimitOptions, clock: Clock = monotonic) -> None:
        self.options = options
        self._clock = clock
        self._interval = options.interval
        self._tolerance = options.tolerance
        self.tat = -math.inf  # a full bucket: no token is owed

    def reserve(self, max_wait: float) -> Admission:
        """A token now, one after a wait shorter than `max_wait`, or a refusal.

        A refusal takes nothing, so a caller that cannot wait costs later callers
        nothing either.
        """
        now = self._clock()
        tat = self.tat if self.tat > now else now
        wait = tat + self._interval - self._tolerance - now
        if wait <= _ROUNDING:
            self.tat = tat + self._interval
            return GRANTED_NOW
        if wait < max_wait:
            self.tat = tat + self._interval
            return Admission(True, wait=wait)
        return Admission(False, retry_after=wait, detail=self._refusal(wait))

    def pause(self, seconds: float) -> None:
        """No token for `seconds`, then one, then the steady rate from an empty bucket."""
        until = self._clock() + seconds
        paused_tat = until + self._tolerance - self._interval
        if paused_tat > self.tat:
            self.tat = paused_tat

    def level(self) -> float:
        """Tokens at hand now, between 0 and `burst` (waiters' reservations count as taken)."""
        ahead = self.tat - self._clock()
        if ahead <= 0.0:
            return float(self.options.burst)
        return max(0.0, (self._tolerance - ahead) / self._interval)

    def _refusal(self, wait: float) -> str:
        options = self.options
        return f"over {options.rate:g}/s (burst {options.burst}); next token in {wait * 1e3:.0f} ms"


class RateLimiter(Protocol):
    """What the pipeline asks before each attempt, and tells after a 429."""

    @property
    def options(self) -> RateLimitOptions: ...

    async def acquire(self, max_wait: float) -> Admission:
        """A token within `max_wait` seconds (the wait is the caller's to sleep), or not."""
        ...

    async def pause(self, seconds: float) -> None:
        """The upstream said "slow down" for `seconds`: no token before then."""
        ...

    def level(self) -> float:
        """Tokens at hand, for the fill-level gauge (the last one seen, when shared)."""
        ...


class LocalLimiter:
    """A `TokenBucket` per sidecar process: `scope: local`."""

    __slots__ = ("bucket",)

    def __init__(self, options: RateLimitOptions, clock: Clock = monotonic) -> None:
        self.bucket = TokenBucket(options, clock)

    @property
    def options(self) -> RateLimitOptions:
        return self.bucket.options

    async def acquire(self, max_wait: float) -> Admission:
        return self.bucket.reserve(max_wait)

    async def pause(self, seconds: float) -> None:
        self.bucket.pause(seconds)

    def level(self) -> float:
        return self.bucket.level()


class BucketStoreUnavailable(Exception):
    """The shared store could not be asked; `SharedLimiter` refuses or allows per config."""


@dataclass(frozen=True, slots=True)
class SharedAnswer:
    """A store's answer to `take`: granted with `wait`, else `retry_after`; `level` after."""

    granted: bool
    wait: float
    level: float


class BucketStore(Protocol):
    """A GCRA bucket kept where every replica sees it, keyed by upstream.

    A backend runs `TokenBucket.reserve` and `TokenBucket.pause` atomically on the
    store's own clock, so the replicas' clocks never matter. Raises
    `BucketStoreUnavailable` when the store cannot be reached. Redis implements it
    (`proxy.storage.limits_redis`); PostgreSQL can, with one row per key.
    """

    async def take(self, key: str, options: RateLimitOptions, max_wait: float) -> SharedAnswer: ...

    async def pause(self, key: str, options: RateLimitOptions, seconds: float) -> None: ...

    async def close(self) -> None: ...


class SharedLimiter:
    """One limit for every replica: the bucket lives in a `BucketStore` (`scope: shared`).

    When the store cannot be asked the limiter fails closed (refuses) unless
    `on_store_down: allow`: an unknown budget is treated as spent, because calls
    past a provider's quota can cost money or a ban, while a refused call is an
    honest 503 the app can retry. A pause is also kept locally, so this replica
    stops asking the provider (and the store) until it ends, even if the store
    write failed.
    """

    __slots__ = ("_clock", "_last_level", "_paused_until", "key", "options", "store")

    def __init__(
        self, store: BucketStore, key: str, options: RateLimitOptions, clock: Clock = monotonic
    ) -> None:
        self.store = store
        self.key = key
        self.options = options
        self._clock = clock
        self._paused_until = -math.inf
        self._last_level = float(options.burst)

    async def acquire(self, max_wait: float) -> Admission:
        paused_for = self._paused_until - self._clock()
        if paused_for >= max_wait:
            return Admission(
                False, retry_after=paused_for, detail="the upstream asked to slow down (429)"
            )
        try:
            # never wait on the store longer than the call could wait for its token
            async with asyncio.timeout(max_wait):
                answer = await self.store.take(self.key, self.options, max_wait)
        except (BucketStoreUnavailable, TimeoutError) as exc:
            detail = f"rate limit store unavailable: {exc or 'no answer in time'}"
            if self.options.on_store_down == "allow":
                return Admission(True, store_down=True, detail=detail)
            return Admission(False, retry_after=1.0, store_down=True, detail=detail)
        self._last_level = answer.level
        if answer.granted:
            wait = max(answer.wait, paused_for)  # a pause the store may not have heard of
            return GRANTED_NOW if wait <= 0.0 else Admission(True, wait=wait)
        return Admission(
            False,
            retry_after=answer.wait,
            detail=f"over {self.options.rate:g}/s (burst {self.options.burst}) across replicas",
        )

    async def pause(self, seconds: float) -> None:
        until = self._clock() + seconds
        if until > self._paused_until:
            self._paused_until = until
        # paused here at least when the store cannot be told; other replicas will hear
        # their own 429, and this call's answer is not held up for long
        with contextlib.suppress(BucketStoreUnavailable, TimeoutError):
            async with asyncio.timeout(PAUSE_WRITE_TIMEOUT):
                await self.store.pause(self.key, self.options, seconds)

    def level(self) -> float:
        return self._last_level
