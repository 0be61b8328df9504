"""What the events tests share: a consumer the test owns on an exchange of its own."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from tests.jobs.test_amqp_queue import rabbitmqctl

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


@dataclass
class Consumer:
    """A queue bound to every event of the test's exchange, and what arrived on it."""

    exchange: str
    connection_name: str
    received: list[dict[str, Any]] = field(default_factory=list)
    messages: list[AbstractIncomingMessage] = field(default_factory=list)

    @property
    def broker(self) -> str:
        return f"{AMQP_URL}?name={self.connection_name}"

    def by_id(self) -> dict[str, dict[str, Any]]:
        """Deduped by the CloudEvents id, as a consumer must."""
        return {event["id"]: event for event in self.received}

    def of_type(self, event_type: str) -> dict[str, dict[str, Any]]:
        return {e["subject"]: e for e in self.by_id().values() if e["type"] == event_type}


@pytest.fixture
async def consumer() -> AsyncIterator[Consumer]:
    tag = uuid.uuid4().hex[:12]
    try:
        connection = await aio_pika.connect(AMQP_URL)
    except Exception:
        pytest.skip(f"no RabbitMQ at {AMQP_URL}")
    found = Consumer(f"test-events-{tag}", f"test-events-{tag}")
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            found.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(f"test-events-{tag}", exclusive=True)
        await queue.bind(exchange, routing_key="checkout.#")

        async def on_message(message: AbstractIncomingMessage) -> None:
            found.messages.append(message)
            found.received.append(json.loads(message.body))
            await message.ack()

        await queue.consume(on_message)
        yield found
        await queue.delete(if_unused=False, if_empty=False)
        await channel.exchange_delete(found.exchange)
    finally:
        await connection.close()


async def close_connections(name: str) -> int:
    """`rabbitmqctl close_connection` for every connection named `name`."""
    listing = await rabbitmqctl(
        "list_connections", "-q", "--no-table-headers", "pid", "client_properties"
    )
    pids = [
        line.split("\t", 1)[0]
        for line in listing.splitlines()
        if f'{{"connection_name","{name}"}}' in line
    ]
    await asyncio.gather(
        *(rabbitmqctl("close_connection", pid, "test: closed on purpose") for pid in pids)
    )
    return len(pids)
