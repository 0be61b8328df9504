"""The shipped checkout (`config/sidecar.yaml`) against the simulator (`config/simulator.yaml`).

Both configs are the files we ship, with only what a test must change: free
ports, the upstream URLs pointing at the simulator, a per-test SQLite store, a
short queue poll so queued work runs promptly, a short job backoff so a job that
failed while an upstream was down is retried within the test, and a recovery
scan so rare that it never races the flow under test.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.app import Sidecar
from proxy.config import source as yamlsource
from proxy.simulator import Simulator, start_simulator

ROOT = Path(__file__).resolve().parents[2]
SIDECAR_YAML = ROOT / "config" / "sidecar.yaml"
SIMULATOR_YAML = ROOT / "config" / "simulator.yaml"
UPSTREAMS = ("payment", "inventory", "shipping", "coupon", "fraud")
TRUSTED_CUSTOMER = "cust-trusted"
FRAUDSTER = "cust-fraudster"  # pinned to `reject` in config/simulator.yaml

# A basket the shipped simulator config can always serve, paid with a good card.
ORDER: dict[str, Any] = {
    "items": [{"sku": "sku-1", "qty": 2}],
    "amount": 10_000,
    "currency": "EUR",
    "customer": TRUSTED_CUSTOMER,
    "card": "4242",
    "address": {"country": "DE", "zip": "10115"},
    "coupon": "SAVE10",
}


def simulator_config() -> dict[str, Any]:
    """`config/simulator.yaml` on free ports."""
    data = yaml.safe_load(SIMULATOR_YAML.read_text())
    for name in UPSTREAMS:
        data["upstreams"][name]["port"] = 0
    # the standard order's customer: screened clean, so only tests that want a flag get one
    data["upstreams"]["fraud"]["customers"][TRUSTED_CUSTOMER] = "approve"
    return data


def sidecar_config(sim: Simulator, store: str) -> dict[str, Any]:
    """`config/sidecar.yaml` aimed at `sim`, with its state in `store`.

    Read with the sidecar's own YAML loader, not `yaml.safe_load`: YAML 1.1 reads
    the key `on:` (retry conditions) as the boolean True, which the config refuses.
    """
    document = yamlsource.parse(SIDECAR_YAML.read_text(), str(SIDECAR_YAML), env={})
    assert document.data is not None and not document.errors, document.errors
    data = copy.deepcopy(document.data)
    for name in UPSTREAMS:
        data["upstreams"][name]["url"] = sim.url(name)
    # the app's callback endpoints are the simulator's /_notify recorder
    data["upstreams"]["orders"]["url"] = f"{sim.url('fraud')}/_notify"
    data["store"] = store
    data["listen"] = "127.0.0.1:0"
    data["admin"] = {"listen": "127.0.0.1:0"}
    queue = data["queue"]
    queue["poll_interval"] = "20ms"
    queue["retry"] = {"max_attempts": 20, "base": "50ms", "multiplier": 2, "max": "300ms"}
    data["composite"]["checkout"]["recovery_interval"] = "1h"
    return data


def relax_timeouts(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with every upstream timeout and the checkout's deadline set to budgets only
    a hang reaches (per try 10 s, the checkout 30 s).

    For a test about something other than time (events, stores): on a loaded machine the
    shipped budgets (coupon's 300 ms per try) can expire on a stalled loop and turn a good
    order into a rejected one, which is not what such a test checks.
    """
    loose = {"connect": "5s", "per_try": "10s", "total": "20s"}
    data["defaults"]["timeout"] = dict(loose)
    for upstream in data["upstreams"].values():
        if "timeout" in upstream:
            upstream["timeout"] = dict(loose)
    checkout = data["composite"]["checkout"]
    checkout["deadline"], checkout["reserve"] = "30s", "5s"
    return data


async def eventually(
    check: Callable[[], Awaitable[bool]], *, seconds: float = 5.0, every: float = 0.02
) -> None:
    """Await `check()` every `every` seconds until it is true; TimeoutError after `seconds`.

    For work the job queue does in the background: bounded, never a bare sleep.
    """
    async with asyncio.timeout(seconds):
        # a poll, not an Event: the conditions live in SQLite and the simulator's ledger
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(every)


@dataclass
class Reply:
    status: int
    headers: Any
    raw: bytes

    def json(self) -> Any:
        return json.loads(self.raw)


@dataclass
class Rig:
    """A running simulator, the shipped sidecar in front of it, and a client."""

    sim: Simulator
    sidecar: Sidecar
    url: str
    http: aiohttp.ClientSession

    async def checkout(
        self,
        body: Any = None,
        *,
        key: str | None = None,
        data: bytes | None = None,
    ) -> Reply:
        """POST /checkout with `body` as JSON (or raw `data`).

        `key` is the Idempotency-Key: a fresh one when None, no header at all when "".
        """
        sent = {"Content-Type": "application/json"}
        if key != "":
            sent["Idempotency-Key"] = key or new_key()
        payload = data if data is not None else json.dumps(body).encode()
        async with self.http.post(f"{self.url}/checkout", data=payload, headers=sent) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    async def poll(self, checkout_id: str) -> dict[str, Any]:
        async with self.http.get(f"{self.url}/checkout/{checkout_id}") as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()  # type: ignore[no-any-return]

    async def queue_depth(self) -> int:
        queue = self.sidecar.durable.queue
        assert queue is not None
        return await queue.depth()

    async def drained(self, *, seconds: float = 5.0) -> None:
        """Wait until the job queue has nothing left to run (dead letters aside)."""

        async def empty() -> bool:
            return await self.queue_depth() == 0

        await eventually(empty, seconds=seconds)

    async def dead_letters(self) -> list[Any]:
        queue = self.sidecar.durable.queue
        assert queue is not None
        return await queue.dead()

    def ledger(self) -> dict[str, Any]:
        return self.sim.ledger.snapshot()

    def hits(self, upstream: str) -> int:
        return int(self.sim.stats(upstream)["total"])


def new_key() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def rig(start_sidecar: Any, tmp_path: Path) -> AsyncIterator[Rig]:
    async with await start_simulator(simulator_config()) as sim:
        store = f"sqlite://{tmp_path}/sidecar-{uuid.uuid4().hex[:8]}.db"
        sidecar, url = await start_sidecar(sidecar_config(sim, store))
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            yield Rig(sim, sidecar, url, http)


@pytest.fixture
def order() -> dict[str, Any]:
    """A fresh copy of the standard order, for a test to change."""
    return copy.deepcopy(ORDER)
