"""The checkout's steps under an upstream's rate limit: the same limit as proxied calls."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.simulator import start_simulator
from tests.checkout.conftest import Rig, sidecar_config, simulator_config


@pytest.fixture
async def limited_rig(start_sidecar: Any, tmp_path: Path) -> AsyncIterator[Rig]:
    """The shipped checkout with payment limited to 2 calls, then one a minute."""
    async with await start_simulator(simulator_config()) as sim:
        data = sidecar_config(sim, f"sqlite://{tmp_path}/sidecar-{uuid.uuid4().hex[:8]}.db")
        data["upstreams"]["payment"]["rate_limit"] = {"rate": "1/m", "burst": 2}
        sidecar, url = await start_sidecar(data)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            yield Rig(sim, sidecar, url, http)


async def test_a_critical_step_without_a_token_in_time_is_unavailable_and_compensated(
    limited_rig: Rig, order: dict[str, Any]
) -> None:
    rig = limited_rig
    first = await rig.checkout(order)  # authorize and capture: both tokens
    assert first.status == 200, first.raw
    hits = rig.hits("payment")

    started = time.monotonic()
    reply = await rig.checkout(order)

    assert time.monotonic() - started < 2.0  # refused at once: the wait would not fit
    assert reply.status == 503, reply.raw  # unavailable, not a 409 refusal
    assert int(reply.headers["Retry-After"]) >= 20  # when the next token comes
    body = reply.json()
    assert body["failed_steps"] == ["payment"]
    assert body["steps"]["payment"]["reason"] == "rate_limited"
    assert body["steps"]["payment"]["attempts"] == 0
    assert "unavailable" in body["error"]
    assert rig.hits("payment") == hits  # never sent
    reservations = rig.ledger()["reservations"]
    assert sorted(r["status"] for r in reservations.values()) == ["committed", "released"]
