"""A checkout takes as long as its slowest step, not the sum, and never outlives its deadline.

The simulator (a child process, so its event loop does not share the sidecar's)
gives each upstream a fixed latency; the sidecar runs in this process.
Wall-clock bounds carry a generous margin because CI machines are shared; the
measured numbers are printed so a regression shows before the bound trips.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from proxy.app import Sidecar
from tests.checkout.ledger_checks import (
    SIM_CONFIG,
    Answer,
    assert_invariants,
    checkout_body,
    drained,
    final_records,
    get_json,
    outcome_counts,
    post_checkout,
    set_faults,
    sidecar_config,
    start_simulator_process,
    wait_until,
)

StartSidecar = Callable[..., Awaitable[tuple[Sidecar, str]]]

# the four sync steps of the shipped checkout; payment and inventory are also
# committed (capture, commit reservation) at the same latency, in parallel
STEP_LATENCY_MS = {"payment": 100, "inventory": 150, "shipping": 200, "coupon": 250}
COMMIT_MS = max(STEP_LATENCY_MS["payment"], STEP_LATENCY_MS["inventory"])
MARGIN_MS = 150


@pytest.fixture
async def sim_urls(tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    process, urls = await start_simulator_process(SIM_CONFIG, tmp_path)
    try:
        yield urls
    finally:
        await process.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def timed(
    client: aiohttp.ClientSession, base: str, key: str, i: int
) -> tuple[float, str, Answer]:
    started = time.monotonic()
    answer = await post_checkout(client, base, key, checkout_body(i, coupon=True))
    return time.monotonic() - started, key, answer


async def test_checkout_takes_the_slowest_step_not_the_sum(
    start_sidecar: StartSidecar,
    sim_urls: dict[str, str],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    config = sidecar_config(
        sim_urls, store=f"sqlite://{tmp_path}/state.db", deadline="3s", per_try="1s", total="2s"
    )
    _, base = await start_sidecar(config)
    await timed(client, base, "warm-up", 0)  # connections, first-call costs
    for name, ms in STEP_LATENCY_MS.items():
        await set_faults(client, {name: sim_urls[name]}, {"latency": {"dist": "fixed", "ms": ms}})

    runs = [await timed(client, base, f"lat-{i}", i) for i in range(20)]
    seconds = [s * 1000 for s, _, _ in runs]
    p50 = statistics.median(seconds)
    slowest, total = max(STEP_LATENCY_MS.values()), sum(STEP_LATENCY_MS.values())
    print(
        f"\n  checkout p50 {p50:.0f} ms, max {max(seconds):.0f} ms (slowest step {slowest} ms "
        f"+ commit {COMMIT_MS} ms; sum of steps {total} ms)"
    )
    assert all(status == 200 for _, _, (status, _) in runs), [a for _, _, a in runs]
    assert p50 < slowest + COMMIT_MS + MARGIN_MS
    assert p50 < total, "the steps ran one after another"


async def test_checkout_with_a_hanging_payment_is_answered_by_its_deadline(
    start_sidecar: StartSidecar,
    sim_urls: dict[str, str],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    deadline = 1.0
    # upstream timeouts far past the deadline: only the checkout's deadline can cut the wait
    config = sidecar_config(
        sim_urls, store=f"sqlite://{tmp_path}/state.db", deadline="1s", per_try="5s", total="10s"
    )
    sidecar, base = await start_sidecar(config)
    await timed(client, base, "warm-up", 0)
    await set_faults(client, {"payment": sim_urls["payment"]}, {"hang_rate": 1.0})

    runs = await asyncio.gather(*(timed(client, base, f"hang-{i}", i) for i in range(20)))
    worst = max(s for s, _, _ in runs)
    answers = [(key, answer) for _, key, answer in runs]
    print(
        f"\n  payment hanging: slowest answer {worst * 1000:.0f} ms "
        f"(deadline {deadline * 1000:.0f} ms); {dict(outcome_counts(answers))}"
    )
    assert worst < deadline + 0.5
    assert all(status in (202, 503) for _, (status, _) in answers), answers

    # once payment answers again, every hanging authorization is learnt and voided
    await set_faults(client, {"payment": sim_urls["payment"]}, {})
    await wait_until(lambda: drained(sidecar), 30, "the compensations to finish")
    ledger = await get_json(client, f"{sim_urls['payment']}/_ledger")
    final = await final_records(client, base, ["warm-up"] + [key for key, _ in answers])
    verdict = assert_invariants(ledger, answers, final)
    assert sorted(set(verdict.decisions.values())) == ["confirmed", "rejected"]
