"""Fallback: what to answer when an upstream call failed for good.

Outside every other policy, a failed call (timeout, open breaker, full bulkhead,
retries exhausted, 5xx, connect failure) may still get a useful answer: the last
good response to the same GET (stale-if-error, RFC 5861), or a configured static
response. Which failures qualify is configured per upstream, because serving a
canned answer is right for shipping quotes and wrong for payments.

This module only decides *what* to serve; the caller builds the HTTP response and
sets `X-Sidecar-Fallback: <reason>` from the answer. Pure: time comes from a clock,
so stale entries expire in tests by advancing a `FakeClock`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cachetools import TTLCache

from proxy.resilience.clock import Clock, monotonic
from proxy.resilience.rules import DEFAULT_FALLBACK_ON, FALLBACK_REASONS

FALLBACK_HEADER = "X-Sidecar-Fallback"

REASONS: frozenset[str] = frozenset(FALLBACK_REASONS)
DEFAULT_ON: frozenset[str] = frozenset(DEFAULT_FALLBACK_ON)

Source = Literal["stale", "static"]


@dataclass(frozen=True, slots=True)
class StaticResponse:
    """A canned answer from the config, e.g. standard shipping when quotes fail."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A good upstream response kept for stale-if-error; headers keep order and repeats."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True, slots=True)
class FallbackAnswer:
    """What to serve instead of the failure, and why (`reason`) and from where (`source`).

    `age` is how many seconds old a stale answer is (0 for static), for an `Age` header.
    """

    reason: str
    source: Source
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    age: float = 0.0


@dataclass(frozen=True, slots=True)
class FallbackOptions:
    """Fallback of one upstream: when it applies (`on`) and what it serves."""

    on: frozenset[str] = DEFAULT_ON
    static: StaticResponse | None = None
    stale: bool = False
    stale_max_age: float = 300.0
    stale_max_entries: int = 1000

    def __post_init__(self) -> None:
        unknown = set(self.on) - REASONS
        if unknown:
            raise ValueError(f"unknown fallback reason(s) {sorted(unknown)}; use {sorted(REASONS)}")
        if self.stale and not self.stale_max_age > 0:
            raise ValueError(f"stale_max_age must be > 0 seconds, got {self.stale_max_age!r}")
        if self.stale and self.stale_max_entries < 1:
            raise ValueError(f"stale_max_entries must be >= 1, got {self.stale_max_entries!r}")


class StaleCache:
    """The last good response per key, bounded in size and age.

    A `TTLCache` driven by the injected clock: an entry older than `max_age` is gone,
    and past `max_entries` the least recently used entry is evicted, so a wide key
    space (many URLs) cannot grow the sidecar's memory without bound.
    """

    def __init__(self, max_entries: int, max_age: float, clock: Clock = monotonic) -> None:
        self._clock = clock
        self._entries: TTLCache[str, tuple[float, CachedResponse]] = TTLCache(
            maxsize=max_entries, ttl=max_age, timer=clock
        )

    def __len__(self) -> int:
        self._entries.expire()
        return len(self._entries)

    def put(self, key: str, response: CachedResponse) -> None:
        """Remember `response` as the latest good answer for `key`."""
        self._entries[key] = (self._clock(), response)

    def get(self, key: str) -> CachedResponse | None:
        """The latest good answer for `key`, if it is younger than `max_age`."""
        entry = self.get_with_age(key)
        return entry[1] if entry is not None else None

    def get_with_age(self, key: str) -> tuple[float, CachedResponse] | None:
        """Like `get`, with the entry's age in seconds."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        stored_at, response = entry
        return self._clock() - stored_at, response


class Fallback:
    """Decides the fallback answer of one upstream from its options and stale cache."""

    def __init__(self, options: FallbackOptions | None = None, clock: Clock = monotonic) -> None:
        self.options = options if options is not None else FallbackOptions()
        opts = self.options
        self._stale = (
            StaleCache(opts.stale_max_entries, opts.stale_max_age, clock) if opts.stale else None
        )

    def store_good(self, key: str, response: CachedResponse) -> None:
        """Keep a good response for stale-if-error; a no-op unless `stale` is on.

        The caller decides what is good and safe to replay (a buffered 2xx to a GET).
        """
        if self._stale is not None:
            self._stale.put(key, response)

    def answer(self, reason: str, key: str | None, method: str) -> FallbackAnswer | None:
        """What to serve for a call that failed with `reason`, or None to fail as usual.

        Stale first (a real answer, only for GET, since replaying other methods'
        responses would lie about a side effect), then the static response.
        """
        if reason not in self.options.on:
            return None
        if self._stale is not None and key is not None and method.upper() == "GET":
            entry = self._stale.get_with_age(key)
            if entry is not None:
                age, cached = entry
                return FallbackAnswer(
                    reason=reason,
                    source="stale",
                    status=cached.status,
                    headers=list(cached.headers),
                    body=cached.body,
                    age=age,
                )
        static = self.options.static
        if static is not None:
            return FallbackAnswer(
                reason=reason,
                source="static",
                status=static.status,
                headers=list(static.headers.items()),
                body=static.body,
            )
        return None
