"""Time as a parameter.

Every policy (deadline, backoff, breaker, budget) reads time through a `Clock`
so tests drive it with `FakeClock.advance()` instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]
"""Monotonic seconds. `time.monotonic` in production."""

monotonic: Clock = time.monotonic


class FakeClock:
    """A clock that moves only when told to; for tests of timing logic."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not run backwards")
        self.now += seconds
