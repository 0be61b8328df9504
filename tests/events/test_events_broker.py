"""Checkout events on a real RabbitMQ, seen by a consumer the test owns.

Each test gets its own exchange and queue (deleted afterwards), and names the
sidecar's event connection (`?name=`), so closing "every connection" closes only
this test's, never another client's of the shared broker.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from proxy.checkout.journal import CheckoutRecord
from proxy.checkout.journal_memory import MemoryJournal
from proxy.events import EventOutbox, checkout_event
from proxy.events.amqp import CONTENT_TYPE, AmqpPublisher
from proxy.simulator import start_simulator
from tests.checkout.conftest import (
    FRAUDSTER,
    ORDER,
    Rig,
    eventually,
    relax_timeouts,
    sidecar_config,
    simulator_config,
)
from tests.events.conftest import Consumer, close_connections


@pytest.fixture
async def rig(start_sidecar: Any, tmp_path: Path, consumer: Consumer) -> AsyncIterator[Rig]:
    """The shipped checkout against the simulator, with `events:` on the test's exchange."""
    async with await start_simulator(simulator_config()) as sim:
        store = f"sqlite://{tmp_path}/sidecar-{uuid.uuid4().hex[:8]}.db"
        config = relax_timeouts(sidecar_config(sim, store))  # these tests count events
        config["events"] = {
            "broker": consumer.broker,
            "exchange": consumer.exchange,
            "source": "urn:test",
            "relay_interval": "100ms",
            "publish_timeout": "2s",
        }
        sidecar, url = await start_sidecar(config)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            yield Rig(sim, sidecar, url, http)


@pytest.fixture
def order() -> dict[str, Any]:
    return copy.deepcopy(ORDER)


# -- the publisher alone --------------------------------------------------------------


async def test_the_publisher_confirms_persistent_events_routed_by_type(
    consumer: Consumer,
) -> None:
    publisher = AmqpPublisher(consumer.broker, consumer.exchange)
    events = [
        checkout_event(kind, "co-1", {"n": 1}, source="urn:test", wall=1.0)
        for kind in ("checkout.confirmed", "checkout.rejected")
    ]
    try:
        confirmed = await publisher.publish(events)
    finally:
        await publisher.close()

    assert confirmed == {"co-1:checkout.confirmed", "co-1:checkout.rejected"}

    async def arrived() -> bool:
        return len(consumer.messages) == 2

    await eventually(arrived)
    first = consumer.messages[0]
    assert first.routing_key == "checkout.confirmed"
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert first.content_type == CONTENT_TYPE
    assert first.message_id == "co-1:checkout.confirmed"
    assert consumer.received[0] == events[0].body


async def test_an_unreachable_broker_confirms_nothing_and_the_outbox_keeps_it() -> None:
    journal = MemoryJournal()
    publisher = AmqpPublisher("amqp://guest:guest@127.0.0.1:1/%2F", "x", timeout=1.0)
    outbox = EventOutbox(journal, publisher)
    await journal.create(CheckoutRecord(id="co-1", key="k"))
    await journal.update("co-1", events=outbox.decided("co-1", True, {}))

    assert await outbox.relay_once() == 0
    assert await journal.outbox_pending() == 1
    await outbox.stop()


# -- checkouts end to end -------------------------------------------------------------


async def test_one_confirmed_event_per_confirmed_checkout_and_rejected_with_failed_steps(
    rig: Rig, consumer: Consumer, order: dict[str, Any]
) -> None:
    declined = {**order, "card": "declined"}
    replies = await asyncio.gather(
        *(rig.checkout(declined if i % 3 == 0 else order) for i in range(12))
    )
    confirmed = {r.json()["checkout_id"] for r in replies if r.json()["decision"] == "confirmed"}
    rejected = {r.json()["checkout_id"] for r in replies if r.json()["decision"] == "rejected"}
    assert len(confirmed) == 8 and len(rejected) == 4

    async def all_arrived() -> bool:
        return (
            set(consumer.of_type("checkout.confirmed")) == confirmed
            and set(consumer.of_type("checkout.rejected")) == rejected
            and set(consumer.of_type("checkout.compensated")) == rejected
        )

    await eventually(all_arrived, seconds=10)
    assert not set(consumer.of_type("checkout.confirmed")) & rejected
    for checkout_id, event in consumer.of_type("checkout.rejected").items():
        assert event["data"]["failed_steps"] == ["payment"], event
        assert event["data"]["checkout_id"] == checkout_id
        assert event["specversion"] == "1.0" and event["source"] == "urn:test"
    for event in consumer.of_type("checkout.confirmed").values():
        assert event["data"]["decision"] == "confirmed"
    await eventually(lambda: _outbox_empty(rig))


async def _outbox_empty(rig: Rig) -> bool:
    assert rig.sidecar.events is not None
    return await rig.sidecar.events.pending() == 0


async def test_events_survive_closing_the_broker_connections_during_traffic(
    rig: Rig, consumer: Consumer, order: dict[str, Any]
) -> None:
    declined = {**order, "card": "declined"}
    stop = asyncio.Event()
    closed = 0

    async def closer() -> None:
        nonlocal closed
        while not stop.is_set():
            closed += await close_connections(consumer.connection_name)
            await asyncio.sleep(0.05)

    closing = asyncio.create_task(closer())
    try:
        replies = []
        for _ in range(5):
            replies += await asyncio.gather(
                *(rig.checkout(declined if i % 4 == 0 else order) for i in range(8))
            )
    finally:
        stop.set()
        await closing
    confirmed = {r.json()["checkout_id"] for r in replies if r.json()["decision"] == "confirmed"}
    rejected = {r.json()["checkout_id"] for r in replies if r.json()["decision"] == "rejected"}
    assert all(r.status in (200, 409) for r in replies)
    assert closed > 0, "the sidecar's event connection must have been closed mid-run"

    async def all_arrived() -> bool:
        return (
            set(consumer.of_type("checkout.confirmed")) == confirmed
            and set(consumer.of_type("checkout.rejected")) == rejected
        )

    await eventually(all_arrived, seconds=20)
    assert not set(consumer.of_type("checkout.confirmed")) & rejected
    await eventually(lambda: _outbox_empty(rig), seconds=10)


async def test_a_flagged_order_is_announced_after_the_fraud_callback(
    rig: Rig, consumer: Consumer, order: dict[str, Any]
) -> None:
    order["customer"] = FRAUDSTER
    reply = await rig.checkout(order)
    assert reply.status == 200, reply.raw
    checkout_id = reply.json()["checkout_id"]

    async def flagged() -> bool:
        return checkout_id in consumer.of_type("checkout.fraud_flagged")

    await eventually(flagged, seconds=10)
    event = consumer.of_type("checkout.fraud_flagged")[checkout_id]
    assert event["data"]["steps"]["fraud"]["body"]["verdict"] == "reject"
    assert checkout_id in consumer.of_type("checkout.confirmed")


async def test_published_events_are_counted_and_the_outbox_is_a_gauge(
    rig: Rig, consumer: Consumer, order: dict[str, Any]
) -> None:
    await rig.checkout(order)
    await eventually(lambda: _outbox_empty(rig))
    metrics = rig.sidecar.metrics
    await metrics.events.refresh(rig.sidecar.events)

    ok = metrics.registry.get_sample_value(
        "sidecar_events_published_total", {"type": "checkout.confirmed", "result": "ok"}
    )
    assert ok is not None and ok >= 1
    assert metrics.registry.get_sample_value("sidecar_events_outbox_pending") == 0


async def test_a_broker_that_never_answers_does_not_delay_the_checkout(
    start_sidecar: Any, tmp_path: Path, order: dict[str, Any]
) -> None:
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepts, then says nothing: a hung broker

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with await start_simulator(simulator_config()) as sim:
            config = sidecar_config(sim, f"sqlite://{tmp_path}/hung.db")
            config["events"] = {
                "broker": f"amqp://guest:guest@127.0.0.1:{port}/%2F",
                "exchange": "never",
                "publish_timeout": "10s",
            }
            sidecar, url = await start_sidecar(config)
            async with aiohttp.ClientSession() as http:
                started = asyncio.get_running_loop().time()
                async with http.post(
                    f"{url}/checkout", json=order, headers={"Idempotency-Key": "hung-1"}
                ) as reply:
                    assert reply.status == 200, await reply.text()
                took = asyncio.get_running_loop().time() - started
            assert took < 2.0, f"the checkout waited {took:.1f}s for the broker"
            assert sidecar.events is not None
            assert await sidecar.events.pending() >= 1
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
