"""Which of a checkout's calls to start first: the one expected to answer last.

Calls started together on one event loop leave one after another: each waits for
the work of those started before it (rendering, the pipeline's policies, the
write), about 0.2-0.25 ms each on the benchmark's machine. The answer waits for the
slowest of them, so any call started ahead of the slowest delays the answer by its
own work, and one started after it delays nothing. Measured in the sidecar with the
shipped config, shipping's quote left before coupon's validation (the slowest step)
and inventory's commit before payment's capture (the slowest action), 0.45 ms in all.

What a call will take is learnt from what it took: an exponentially weighted
average per call (a step's request by the step's name, an action as
`step:action`), kept for the process. Calls not seen yet come first, in the plan's
order, so a new or renamed step is never held back behind known fast ones. The
order changes only when a call is slower by more than `MARGIN`, so two calls about
as slow keep the plan's order rather than swapping with noise. Pure: what is
observed comes from the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

WEIGHT = 0.2
"""The weight of the newest latency in a call's average: about the last ten count."""
MARGIN = 1.25
"""How much slower a call must be expected to be to go ahead of one the plan put first."""


class CallOrder:
    """Expected latencies of a checkout's calls, and the order to start them in."""

    def __init__(self, weight: float = WEIGHT, margin: float = MARGIN) -> None:
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight must be in (0, 1], got {weight!r}")
        if margin < 1.0:
            raise ValueError(f"margin must be >= 1, got {margin!r}")
        self._weight = weight
        self._margin = margin
        self._expected: dict[str, float] = {}

    def observe(self, call: str, seconds: float) -> None:
        """`call` took `seconds` (to its answer, or to giving up on it)."""
        if seconds < 0:
            return
        known = self._expected.get(call)
        self._expected[call] = (
            seconds if known is None else known + self._weight * (seconds - known)
        )

    def expected(self, call: str) -> float | None:
        """The call's expected latency in seconds; None until it has been observed."""
        return self._expected.get(call)

    def slowest_first(self, items: Iterable[T], call: Callable[[T], str]) -> list[T]:
        """`items` in the order to start their calls: unseen ones first, in their
        given order, then the rest slowest first, each moving ahead of an earlier
        one only when slower by more than the margin."""
        unseen: list[T] = []
        seen: list[tuple[float, T]] = []
        for item in items:
            expected = self._expected.get(call(item))
            if expected is None:
                unseen.append(item)
            else:
                seen.append((expected, item))
        ordered: list[tuple[float, T]] = []
        for expected, item in seen:  # an insertion sort: a plan has a handful of steps
            at = len(ordered)
            while at > 0 and expected > ordered[at - 1][0] * self._margin:
                at -= 1
            ordered.insert(at, (expected, item))
        return unseen + [item for _, item in ordered]
