"""Where events go: a small protocol a broker client implements.

`publish` answers with the ids the broker confirmed, never raises for a broker
failure, and may confirm only some of the events; the outbox keeps the rest for
the relay. AMQP (`proxy.events.amqp`) is the one broker built; Kafka (acks=all) or
SQS (SendMessageBatch's successful entries) fit the same shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from proxy.checkout.journal import OutboxEvent


@runtime_checkable
class EventPublisher(Protocol):
    name: str
    """Where events go, without secrets, for logs."""

    async def publish(self, events: Sequence[OutboxEvent]) -> set[str]:
        """Send `events`; return the ids the broker confirmed it has kept."""
        ...

    async def close(self) -> None: ...


class MemoryPublisher:
    """Keeps what it was given, for tests; `down` makes it confirm nothing."""

    def __init__(self) -> None:
        self.name = "memory"
        self.published: list[OutboxEvent] = []
        self.down = False

    async def publish(self, events: Sequence[OutboxEvent]) -> set[str]:
        if self.down:
            return set()
        self.published.extend(events)
        return {event.id for event in events}

    async def close(self) -> None:
        return None
