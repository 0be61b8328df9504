"""Checkout events for other services: CloudEvents kept in the journal's outbox until a
broker confirms them (see `proxy.events.outbox`)."""

from proxy.events.cloudevents import checkout_event
from proxy.events.outbox import EventHooks, EventOptions, EventOutbox
from proxy.events.publisher import EventPublisher, MemoryPublisher

__all__ = [
    "EventHooks",
    "EventOptions",
    "EventOutbox",
    "EventPublisher",
    "MemoryPublisher",
    "checkout_event",
]
