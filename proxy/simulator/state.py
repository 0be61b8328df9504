"""Everything the five upstreams share at run time, and how to put it back to the start.

Kept apart from the servers so `/_reset`, `/_faults` and `Simulator.set_faults`
change the same objects the request path reads: the middleware looks up the
fault plan on every request, never keeps a copy.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

from .config import UPSTREAMS, Faults, SimulatorConfig
from .faults import FaultPlan
from .ledger import Ledger


class SimulatorState:
    """The shared ledger, and per upstream: its fault plan and its hit counts."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        inventory = config.upstreams.inventory
        self.ledger = Ledger(stock=inventory.stock, default_stock=inventory.default_stock)
        self.plans: dict[str, FaultPlan] = {}
        self.hits: dict[str, Counter[str]] = {}
        self.injected: dict[str, Counter[str]] = {}
        # Set on shutdown so hanging requests give up instead of holding the server open.
        self.stopping = asyncio.Event()
        self._hit_events: dict[str, asyncio.Event] = {}
        self.reset()

    def reset(self) -> None:
        """Empty ledger, zero counts, the configured faults and freshly seeded randomness."""
        self.ledger.reset()
        for name in UPSTREAMS:
            faults = self.config.upstream(name).faults()
            self.plans[name] = FaultPlan(faults, random.Random(f"{self.config.seed}:{name}"))
            self.hits[name] = Counter()
            self.injected[name] = Counter()

    def count_hit(self, name: str, route: str) -> None:
        """Record a request that reached `name`, and wake whoever waits for it."""
        self.hits[name][route] += 1
        event = self._hit_events.pop(name, None)
        if event is not None:
            event.set()

    async def wait_for_hits(self, name: str, count: int) -> None:
        """Return once `name` has seen `count` API requests since the last reset.

        Lets a test hold N requests hanging in an upstream, then act, without sleeping.
        """
        while sum(self.hits[name].values()) < count:
            await self._hit_events.setdefault(name, asyncio.Event()).wait()

    def set_faults(self, name: str, faults: Faults) -> None:
        self.plans[name].replace(faults)

    def stats(self, name: str) -> dict[str, Any]:
        """Requests that reached `name` by route (`POST /authorize`), and the faults it injected."""
        hits = self.hits[name]
        return {
            "upstream": name,
            "total": sum(hits.values()),
            "routes": dict(hits),
            "faults": dict(self.injected[name]),
        }
