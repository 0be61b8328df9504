"""The delay before retry number n: exponential, capped, jittered.

Jitter spreads the retries of many clients so a recovering upstream is not hit by
a synchronised wave (AWS Architecture Blog, "Exponential Backoff And Jitter").
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Jitter = Literal["none", "full", "equal"]


@dataclass(frozen=True, slots=True)
class BackoffOptions:
    base: float = 0.1
    multiplier: float = 2.0
    max: float = 2.0
    jitter: Jitter = "full"


def backoff_ceiling(options: BackoffOptions, retry_number: int) -> float:
    """The un-jittered delay before retry `retry_number` (1 = first retry)."""
    exponent = max(0, retry_number - 1)
    # cap the exponent so a large attempt count cannot overflow a float
    delay = options.base * options.multiplier ** min(exponent, 64)
    return delay if delay < options.max else options.max


def backoff_delay(
    options: BackoffOptions, retry_number: int, rng: random.Random | None = None
) -> float:
    """The delay to sleep before retry `retry_number`; never above `options.max`."""
    ceiling = backoff_ceiling(options, retry_number)
    if options.jitter == "none":
        return ceiling
    uniform = (rng or random).uniform
    if options.jitter == "full":
        return uniform(0.0, ceiling)
    half = ceiling / 2.0
    return half + uniform(0.0, half)
