"""Deciding which fault, if any, a request gets: pure logic, no aiohttp.

The decision is separate from carrying it out (`middleware.py`) so the
probabilities, the latency distributions and the `fail_next` countdown can be
tested without sockets, with a seeded `random.Random`.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from .config import Faults, FixedLatency, Latency, LognormalLatency, UniformLatency


class Action(enum.Enum):
    PASS = "pass"  # answer normally (maybe late, maybe slowly)
    STATUS = "status"  # answer with an error status, do not act
    RESET = "reset"  # drop the connection, do not act
    HANG = "hang"  # never answer, until the client goes away
    RESET_AFTER = "reset_after"  # act, then drop the connection: the answer is lost
    HANG_AFTER = "hang_after"  # act, then never answer: the client times out after it acted


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do to one request."""

    action: Action = Action.PASS
    status: int = 0
    retry_after: int | None = None
    delay_s: float = 0.0
    slow_body_bytes_per_s: int | None = None


def sample_latency_ms(latency: Latency | None, rng: random.Random) -> float:
    """One draw from the configured latency distribution, in milliseconds."""
    if latency is None:
        return 0.0
    if isinstance(latency, FixedLatency):
        return latency.ms
    if isinstance(latency, UniformLatency):
        return rng.uniform(latency.min_ms, latency.max_ms)
    if isinstance(latency, LognormalLatency):
        return rng.lognormvariate(latency.mu, latency.sigma)
    raise TypeError(f"unknown latency {latency!r}")


class FaultPlan:
    """One upstream's faults and the state they need: the RNG and the `fail_next` countdown."""

    def __init__(self, faults: Faults, rng: random.Random) -> None:
        self.rng = rng
        self.faults = faults
        self.remaining_failures = 0
        self.replace(faults)

    def replace(self, faults: Faults) -> None:
        """Swap in new faults at run time; a new `fail_next` restarts the countdown."""
        self.faults = faults
        self.remaining_failures = faults.fail_next.count if faults.fail_next else 0
        if faults.seed is not None:
            self.rng.seed(faults.seed)

    def decide(self) -> Decision:
        """Draw the fate of the next API request."""
        faults = self.faults
        delay_s = sample_latency_ms(faults.latency, self.rng) / 1000.0
        if self.remaining_failures > 0 and faults.fail_next is not None:
            self.remaining_failures -= 1
            kind = Action(faults.fail_next.kind)
            return Decision(kind, faults.fail_next.status, faults.retry_after, delay_s)
        # Always draw every number, so one rate changing does not shift the others' sequence.
        hang, reset, error, slow = (self.rng.random() for _ in range(4))
        if hang < faults.hang_rate:
            return Decision(Action.HANG, delay_s=delay_s)
        if reset < faults.reset_rate:
            return Decision(Action.RESET, delay_s=delay_s)
        if error < faults.error_rate:
            return Decision(Action.STATUS, faults.error_status, faults.retry_after, delay_s)
        if slow < faults.slow_body_rate:
            return Decision(delay_s=delay_s, slow_body_bytes_per_s=faults.slow_body_bytes_per_s)
        return Decision(delay_s=delay_s)

    def describe(self) -> dict[str, object]:
        """The faults as JSON, with how many `fail_next` failures are still to come."""
        return {
            "faults": self.faults.model_dump(mode="json", exclude_defaults=True),
            "remaining_failures": self.remaining_failures,
        }
