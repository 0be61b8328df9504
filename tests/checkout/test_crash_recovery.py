"""A sidecar killed mid-checkout leaves nothing hanging once it is back.

The sidecar runs as a child process with a SQLite store and is killed with
SIGKILL while checkouts are in flight at a slow payment upstream: authorizations
exist that were neither captured nor voided, reservations are held. The same
config and store are started again; its recovery must drive every journalled
checkout to a final state, so that every authorization is either captured for a
checkout that says `confirmed` or voided, and no reservation is left held.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.simulator import Simulator, start_simulator
from tests.checkout.ledger_checks import (
    SIM_CONFIG,
    Answer,
    assert_invariants,
    checkout_body,
    final_records,
    post_checkout,
    sidecar_config,
    start_sidecar_process,
    wait_until,
    write_yaml,
)

PAYMENT_MS = 800
CHECKOUTS = 20


@pytest.fixture
async def slow_payment() -> AsyncIterator[Simulator]:
    config = {
        **SIM_CONFIG,
        "upstreams": {
            **SIM_CONFIG["upstreams"],
            "payment": {"latency": {"dist": "fixed", "ms": PAYMENT_MS}},
        },
    }
    async with await start_simulator(config) as simulator:
        yield simulator


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_killed_sidecar_recovers_every_checkout_it_left_unfinished(
    slow_payment: Simulator, tmp_path: Path
) -> None:
    sim = slow_payment
    urls = {name: sim.url(name) for name in sim.ports}
    config = sidecar_config(
        urls,
        store=f"sqlite://{tmp_path}/state.db",
        deadline="3s",
        reserve="500ms",
        per_try="1500ms",
        total="2500ms",
        recovery_interval="200ms",
    )
    path = write_yaml(tmp_path / "sidecar.yaml", config)
    keys = [f"crash-{i}" for i in range(CHECKOUTS)]
    answers: list[tuple[str, Answer]] = []

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
        first, base, _ = await start_sidecar_process(path, tmp_path / "sidecar-1.log")
        try:

            async def one(i: int, key: str) -> None:
                await asyncio.sleep(0.04 * i)  # spread out: some authorized, some still asking
                answers.append((key, await post_checkout(client, base, key, checkout_body(i))))

            inflight = [asyncio.create_task(one(i, key)) for i, key in enumerate(keys)]
            await wait_until(
                lambda: _true(len(sim.ledger.authorizations) >= 6),
                10,
                "authorizations to reach the payment upstream",
                every=0.01,
            )
            first.kill()
            await asyncio.gather(*inflight)
        finally:
            await first.stop()

        counts = sim.ledger.counts()
        print(f"\n  at the kill: answers {[a[0] for _, a in answers]}; ledger {counts}")
        assert counts.get("authorized", 0) + counts.get("reserved", 0) > 0, "nothing was left"

        second, base, _ = await start_sidecar_process(path, tmp_path / "sidecar-2.log")
        try:

            async def recovered() -> bool:
                counts = sim.ledger.counts()
                if counts.get("authorized") or counts.get("reserved"):
                    return False
                final = await final_records(client, base, keys)
                return all(record["state"] == "final" for record in final.values())

            waited = await wait_until(recovered, 40, "recovery to finish", every=0.2)
            final = await final_records(client, base, keys)
        finally:
            await second.stop()

    ledger = sim.ledger.snapshot()
    decisions = sorted(record["decision"] for record in final.values())
    print(f"  recovered in {waited:.1f}s: decisions {decisions}; ledger {ledger['counts']}")
    assert final, "the killed sidecar had journalled checkouts"
    assert_invariants(ledger, answers, final)


async def _true(value: bool) -> bool:
    return value
