"""A checkout event as a CloudEvents 1.0 message in structured JSON mode.

The whole message is built once, when the event is written to the outbox, so every
delivery of it (the first publish, the relay's, recovery's) carries the same bytes,
and its `id` (`<checkout id>:<type>`) is what a consumer dedupes redeliveries by.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from proxy.checkout.journal import OutboxEvent, json_copy

SPECVERSION = "1.0"


def event_id(checkout_id: str, event_type: str) -> str:
    """Stable per event: a checkout has each type of event at most once."""
    return f"{checkout_id}:{event_type}"


def rfc3339(wall: float) -> str:
    """CloudEvents' `time`: RFC 3339 in UTC, to the millisecond."""
    stamp = datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def checkout_event(
    event_type: str, checkout_id: str, data: Any, *, source: str, wall: float
) -> OutboxEvent:
    """The CloudEvent of `event_type` for a checkout; `data` is its answer body."""
    identifier = event_id(checkout_id, event_type)
    body: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": identifier,
        "source": source,
        "type": event_type,
        "time": rfc3339(wall),
        "subject": checkout_id,
        "datacontenttype": "application/json",
        "data": json_copy(data),
    }
    return OutboxEvent(identifier, checkout_id, event_type, body)
