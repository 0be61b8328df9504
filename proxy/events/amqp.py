"""Checkout events on a RabbitMQ topic exchange (aio-pika, AMQP 0-9-1).

The exchange is durable and of type topic; an event's routing key is its type, so a
consumer binds `checkout.rejected`, or `checkout.*`. Messages are persistent and
every publish waits for the broker's publisher confirm: only a confirmed id is
reported, and only then does the outbox let the event go. (A confirm means the
broker routed and kept the message for every bound queue; a message no queue is
bound to is confirmed and dropped, as AMQP has it: consumers declare their queues.)

The connection is opened on the first publish, named (`connection_name`, or the
URL's `?name=`) so an operator can see and close it, and dropped at the first
failure; the next publish connects again. While the broker is down every publish
confirms nothing, at once or within `timeout`, and the outbox keeps the events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from urllib.parse import parse_qs, urlsplit

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from proxy.checkout.journal import OutboxEvent
from proxy.storage.url import redact_url

log = logging.getLogger("proxy.events")

CONTENT_TYPE = "application/cloudevents+json"
"""CloudEvents structured mode over AMQP: the whole event is the body."""

DEFAULT_CONNECTION_NAME = "checkout-sidecar events"


class AmqpPublisher:
    """Publishes to one topic exchange with confirms, over a connection of its own."""

    def __init__(
        self,
        url: str,
        exchange: str,
        *,
        connection_name: str = DEFAULT_CONNECTION_NAME,
        timeout: float = 5.0,
    ) -> None:
        self.name = redact_url(url)
        self._url = url
        self._exchange_name = exchange
        self._connection_name = connection_name
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def _open(self) -> AbstractExchange:
        async with self._lock:
            if self._exchange is not None and self._connection is not None:
                if not self._connection.is_closed:
                    return self._exchange
                await self._drop()
            if "name" in parse_qs(urlsplit(self._url).query):  # the URL's ?name= wins
                connection = await aio_pika.connect(self._url)
            else:
                connection = await aio_pika.connect(
                    self._url, client_properties={"connection_name": self._connection_name}
                )
            try:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.declare_exchange(
                    self._exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    await connection.close()
                raise
            self._connection, self._channel, self._exchange = connection, channel, exchange
            return exchange

    async def _drop(self) -> None:
        connection, channel = self._connection, self._channel
        self._connection, self._channel, self._exchange = None, None, None
        if channel is not None:  # first, or aio-pika leaves a close callback pending
            with contextlib.suppress(Exception):
                await channel.close()
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def publish(self, events: Sequence[OutboxEvent]) -> set[str]:
        if not events:
            return set()
        try:
            async with asyncio.timeout(self._timeout):
                exchange = await self._open()
                results = await asyncio.gather(
                    *(self._publish_one(exchange, event) for event in events),
                    return_exceptions=True,
                )
        except Exception as exc:  # the broker is down or slow: the outbox keeps them
            log.warning("events: cannot publish to %s: %s", self.name, exc or type(exc).__name__)
            await self._drop()
            return set()
        confirmed = {e.id for e, r in zip(events, results, strict=True) if r is None}
        if len(confirmed) < len(events):
            failed = next(r for r in results if r is not None)
            log.warning("events: %s not confirmed: %s", len(events) - len(confirmed), failed)
            await self._drop()
        return confirmed

    @staticmethod
    async def _publish_one(exchange: AbstractExchange, event: OutboxEvent) -> None:
        message = aio_pika.Message(
            body=json.dumps(event.body, separators=(",", ":")).encode(),
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event.id,
            type=event.type,
        )
        await exchange.publish(message, routing_key=event.type)

    async def close(self) -> None:
        async with self._lock:
            await self._drop()
