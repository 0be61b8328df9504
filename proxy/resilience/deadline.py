"""A call's time budget, and the arithmetic every layer below it uses.

The deadline is the outermost policy: nothing below it (bulkhead queue, attempts,
backoff sleeps, body streaming) may wait past it, and what is left of it travels
upstream in `X-Request-Timeout-Ms` so the upstream can give up when the caller
will have.
"""

from __future__ import annotations

from proxy.resilience.clock import Clock, monotonic

HEADER = "X-Request-Timeout-Ms"


class InvalidTimeoutHeader(ValueError):
    """An incoming X-Request-Timeout-Ms that is not a non-negative integer."""


def parse_timeout_header(value: str | None) -> float | None:
    """Seconds from an `X-Request-Timeout-Ms` value; None when absent."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit():
        raise InvalidTimeoutHeader(
            f"{HEADER} must be a whole number of milliseconds, got {value[:40]!r}"
        )
    return int(text) / 1000.0


class Deadline:
    """An absolute point on a monotonic clock after which the call has failed."""

    __slots__ = ("_clock", "expires_at")

    def __init__(self, expires_at: float, clock: Clock = monotonic) -> None:
        self.expires_at = expires_at
        self._clock = clock

    @classmethod
    def after(cls, seconds: float, clock: Clock = monotonic) -> Deadline:
        return cls(clock() + max(0.0, seconds), clock)

    @classmethod
    def for_call(
        cls, total: float, requested: float | None = None, clock: Clock = monotonic
    ) -> Deadline:
        """The smallest of the route's `timeout.total` and the caller's own budget."""
        budget = total if requested is None or total < requested else requested
        return cls(clock() + (budget if budget > 0.0 else 0.0), clock)  # `after`, one call less

    def within(self, seconds: float) -> Deadline:
        """A deadline no later than this one and `seconds` from now (a step inside a call)."""
        return Deadline(min(self.expires_at, self._clock() + seconds), self._clock)

    def remaining(self) -> float:
        """Seconds left, never negative."""
        left = self.expires_at - self._clock()
        return left if left > 0.0 else 0.0

    @property
    def expired(self) -> bool:
        return self._clock() >= self.expires_at

    def cap(self, seconds: float) -> float:
        """`seconds`, shortened so that it ends no later than the deadline."""
        left = self.remaining()
        return seconds if seconds < left else left

    def allows_wait(self, seconds: float) -> bool:
        """Whether waiting `seconds` still leaves time for something after the wait."""
        return seconds < self.remaining()

    @staticmethod
    def header_value(seconds: float) -> str:
        """Milliseconds for X-Request-Timeout-Ms, rounded down so we never promise more."""
        return str(int(seconds * 1000))
