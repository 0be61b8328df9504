"""The checkout's invariants under concurrency and under faults, proven by the ledger.

Nobody is charged twice, nothing is charged without an order, no order is
confirmed when a critical step failed (see `ledger_checks`). The sidecar runs in
this process (so the test can read its journal and queue); the simulator runs in
a child process, so the two share the machine's cores instead of one event loop.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

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
from tests.events.conftest import AMQP_URL, Consumer, consumer  # noqa: F401 (a fixture)
from tests.jobs.conftest import delete_amqp_queues

IN_PROGRESS = "idempotency_key_in_progress"
StartSidecar = Callable[..., Awaitable[tuple[Sidecar, str]]]


@pytest.fixture
async def sim_urls(tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    process, urls = await start_simulator_process(SIM_CONFIG, tmp_path)
    try:
        yield urls
    finally:
        await process.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


async def test_concurrent_repeats_of_a_key_authorize_and_capture_once(
    start_sidecar: StartSidecar,
    sim_urls: dict[str, str],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    # 200 requests at once on one loop: budgets that only a hang reaches, since this test
    # counts charges per key and a stalled loop's timeouts would reject good orders; the
    # connect budget too (800 connects at once: under a loaded CI one to inventory
    # outlasted the tests' default 250 ms and turned a good order into a rejected one)
    config = sidecar_config(
        sim_urls,
        store=f"sqlite://{tmp_path}/state.db",
        deadline="20s",
        reserve="2s",
        connect="5s",
        per_try="5s",
        total="10s",
    )
    sidecar, base = await start_sidecar(config)
    keys = [f"dup-{i}" for i in range(20)]
    requests = [(key, checkout_body(i)) for i, key in enumerate(keys) for _ in range(10)]
    random.Random(1).shuffle(requests)

    async def one(key: str, body: dict[str, Any]) -> tuple[str, Answer]:
        return key, await post_checkout(client, base, key, body)

    answers = await asyncio.gather(*(one(key, body) for key, body in requests))
    await wait_until(lambda: drained(sidecar), 20, "the queue to drain")

    by_key: dict[str, list[Answer]] = defaultdict(list)
    for key, answer in answers:
        by_key[key].append(answer)
    for key, seen in by_key.items():
        in_progress = [b for s, b in seen if s == 409 and b.get("reason") == IN_PROGRESS]
        ran = [(status, body) for status, body in seen if body not in in_progress]
        assert ran, f"{key}: every answer was 409 in progress"
        assert {status for status, _ in ran} == {200}, f"{key}: {seen}"
        assert all(body == ran[0][1] for _, body in ran), f"{key}: answers differ"
        assert ran[0][1]["status"] == "confirmed"

    ledger = await get_json(client, f"{sim_urls['payment']}/_ledger")
    print(f"\n  duplicates: {outcome_counts(answers)}; ledger {ledger['counts']}")
    assert len(ledger["authorizations"]) == 20
    assert len(ledger["captures"]) <= 20
    assert_invariants(ledger, answers, await final_records(client, base, keys))


async def _keyed(client: aiohttp.ClientSession, base: str, key: str, i: int) -> tuple[str, Answer]:
    return key, await post_checkout(client, base, key, checkout_body(i))


async def soak(
    start_sidecar: StartSidecar,
    sim_urls: dict[str, str],
    client: aiohttp.ClientSession,
    tmp_path: Path,
    checkouts: int,
    *,
    queue_store: str | None = None,
    events: dict[str, Any] | None = None,
    settled: Callable[[Sidecar, dict[str, dict[str, Any]]], Awaitable[None]] | None = None,
) -> None:
    """`checkouts` checkouts, 50 at a time, with 20% faults on every upstream; then the
    faults stop, everything is driven to its end, and the ledger must agree.

    `queue_store` puts the job queue elsewhere than the state store, `events` is an
    `events:` section, and `settled` checks more once every checkout is final."""
    config = sidecar_config(sim_urls, store=f"sqlite://{tmp_path}/state.db", deadline="1s")
    if queue_store is not None:
        config["queue"]["store"] = queue_store
    if events is not None:
        config["events"] = events
    sidecar, base = await start_sidecar(config)
    # warm up first (connection pools, first-call costs of both processes): a cold
    # start under 50 concurrent checkouts can time out enough calls to open breakers
    warm = [f"warm-{i}" for i in range(20)]
    answers = [await _keyed(client, base, key, i) for i, key in enumerate(warm[:5])]
    answers += await asyncio.gather(*(_keyed(client, base, key, 0) for key in warm[5:]))
    faults = {"error_rate": 0.08, "hang_rate": 0.06, "reset_rate": 0.06}
    for n, url in enumerate(sim_urls.values()):  # a seed each: faults not in lockstep
        await set_faults(client, {"": url}, {**faults, "seed": 11 + n})

    keys = [f"soak-{i}" for i in range(checkouts)]
    slots = asyncio.Semaphore(50)

    async def one(i: int, key: str) -> tuple[str, Answer]:
        async with slots:
            return await _keyed(client, base, key, i)

    started = time.monotonic()
    answers += await asyncio.gather(*(one(i, key) for i, key in enumerate(keys)))
    ran_for = time.monotonic() - started

    await set_faults(client, sim_urls, {})
    settled_in = await wait_until(lambda: drained(sidecar), 60, "every checkout to be final")
    assert sidecar.durable.queue is not None
    dead = await sidecar.durable.queue.dead()
    ledger = await get_json(client, f"{sim_urls['payment']}/_ledger")
    final = await final_records(client, base, warm + keys)
    counts = outcome_counts(answers)
    why = Counter(  # what went wrong, by step and reason, over every answer
        f"{name}:{step.get('reason')}"
        for _, (_, body) in answers
        if isinstance(body, dict) and isinstance(body.get("steps"), dict)
        for name, step in body["steps"].items()
        if step.get("reason") not in (None, "ok", "skipped")
    )
    stats = await get_json(client, f"{sim_urls['payment']}/_stats?all=1")
    injected = {name: s["faults"] for name, s in stats.items()}
    print(
        f"\n  soak of {checkouts}: {dict(sorted(counts.items()))} in {ran_for:.1f}s, "
        f"settled in {settled_in:.1f}s\n  step failures {dict(sorted(why.items()))}"
        f"\n  injected {injected}\n  ledger {ledger['counts']}"
    )
    assert not dead, f"dead-lettered jobs: {[(j.type, j.id, j.error) for j in dead]}"
    assert len(final) == len(warm) + checkouts, "every checkout is in the journal"
    assert_invariants(ledger, answers, final)
    assert counts["confirmed"] > len(warm) and sum(counts.values()) == len(answers)
    if settled is not None:
        await settled(sidecar, final)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_soak_with_faults_on_every_upstream_keeps_the_invariants(
    start_sidecar: StartSidecar,
    sim_urls: dict[str, str],
    client: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    # about 40 s on a 2-core machine: `slow`, so `make check` leaves it to `make test`
    await soak(start_sidecar, sim_urls, client, tmp_path, 2000)


@pytest.fixture
async def amqp_prefix() -> AsyncIterator[str]:
    """A job-queue prefix of the test's own; its RabbitMQ queues are deleted afterwards."""
    prefix = f"test-soak-{uuid.uuid4().hex[:12]}."
    yield prefix
    await delete_amqp_queues(prefix)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_soak_with_the_queue_on_rabbitmq_and_events_on_keeps_the_invariants(
    amqp_prefix: str,  # first: torn down after the sidecar, which could redeclare queues
    start_sidecar: StartSidecar,
    sim_urls: dict[str, str],
    client: aiohttp.ClientSession,
    tmp_path: Path,
    consumer: Consumer,  # noqa: F811 (the fixture imported from tests/events)
) -> None:
    async def events_match(sidecar: Sidecar, final: dict[str, dict[str, Any]]) -> None:
        assert sidecar.events is not None
        await wait_until(_outbox_empty(sidecar), 120, "the events outbox to drain")
        confirmed = {cid for cid, r in final.items() if r.get("decision") == "confirmed"}
        rejected = {cid for cid, r in final.items() if r.get("decision") == "rejected"}
        assert confirmed | rejected == set(final), "every checkout ends confirmed or rejected"

        async def all_arrived() -> bool:
            return (
                set(consumer.of_type("checkout.confirmed")) == confirmed
                and set(consumer.of_type("checkout.rejected")) == rejected
            )

        await wait_until(all_arrived, 60, "every decision's event to arrive")
        await asyncio.sleep(1.0)  # late duplicates would show here
        by_type = Counter((event["type"], event["subject"]) for event in consumer.by_id().values())
        assert all(n == 1 for n in by_type.values()), "one event per (type, checkout) by id"
        assert set(consumer.of_type("checkout.confirmed")) == confirmed
        assert not set(consumer.of_type("checkout.confirmed")) & rejected
        assert set(consumer.of_type("checkout.rejected")) == rejected
        for event in consumer.of_type("checkout.rejected").values():
            assert event["data"]["failed_steps"], event
        print(f"  events {dict(Counter(e['type'] for e in consumer.by_id().values()))}")

    await soak(
        start_sidecar,
        sim_urls,
        client,
        tmp_path,
        2000,
        queue_store=f"{AMQP_URL}?prefix={amqp_prefix}",
        events={
            "broker": consumer.broker,
            "exchange": consumer.exchange,
            "types": ["checkout.confirmed", "checkout.rejected"],
            "relay_interval": "200ms",
            "publish_timeout": "5s",
        },
        settled=events_match,
    )


def _outbox_empty(sidecar: Sidecar) -> Callable[[], Awaitable[bool]]:
    async def empty() -> bool:
        assert sidecar.events is not None
        return await sidecar.events.pending() == 0

    return empty
