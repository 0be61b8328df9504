"""The events outbox on the memory journal and an in-memory publisher: what is
written with a checkout's records, what is published, what the relay sends again."""

from __future__ import annotations

from typing import Any

from proxy.checkout.journal import CheckoutRecord
from proxy.checkout.journal_memory import MemoryJournal
from proxy.events import EventHooks, EventOptions, EventOutbox, MemoryPublisher, checkout_event
from proxy.events.outbox import COMPENSATED, CONFIRMED, REJECTED

WALL = 1_700_000_000.0


class Counted(EventHooks):
    def __init__(self) -> None:
        self.results: list[tuple[str, str]] = []

    def published(self, event_type: str, result: str) -> None:
        self.results.append((event_type, result))


def outbox(**options: Any) -> tuple[EventOutbox, MemoryJournal, MemoryPublisher, Counted]:
    journal = MemoryJournal(wall=lambda: WALL)
    publisher = MemoryPublisher()
    hooks = Counted()
    box = EventOutbox(journal, publisher, EventOptions(**options), hooks=hooks, wall=lambda: WALL)
    return box, journal, publisher, hooks


async def decided(journal: MemoryJournal, box: EventOutbox, checkout_id: str) -> list[Any]:
    await journal.create(CheckoutRecord(id=checkout_id, key=f"k-{checkout_id}"))
    events = box.decided(checkout_id, True, {"checkout_id": checkout_id, "status": "confirmed"})
    await journal.update(checkout_id, state="decided", decision="confirmed", events=events)
    return events


def test_an_event_is_a_structured_cloudevent_with_a_stable_id() -> None:
    event = checkout_event(
        REJECTED, "co-1", {"failed_steps": ["payment"]}, source="urn:test", wall=WALL
    )

    assert event.id == "co-1:checkout.rejected"
    assert event.body == {
        "specversion": "1.0",
        "id": "co-1:checkout.rejected",
        "source": "urn:test",
        "type": "checkout.rejected",
        "time": "2023-11-14T22:13:20.000Z",
        "subject": "co-1",
        "datacontenttype": "application/json",
        "data": {"failed_steps": ["payment"]},
    }


def test_types_not_configured_are_not_written() -> None:
    box, *_ = outbox(types=frozenset({REJECTED}))

    assert box.decided("co-1", True, {}) == []
    assert [e.type for e in box.decided("co-1", False, {})] == [REJECTED]


def test_only_a_rejected_checkout_is_compensated_when_it_finishes() -> None:
    box, *_ = outbox()
    confirmed = CheckoutRecord(id="co-1", key="k", decision="confirmed")
    rejected = CheckoutRecord(id="co-2", key="k", decision="rejected")

    assert box.finished(confirmed, {}) == []
    assert [e.type for e in box.finished(rejected, {})] == [COMPENSATED]


async def test_published_events_are_marked_sent_on_confirm() -> None:
    box, journal, publisher, hooks = outbox()
    events = await decided(journal, box, "co-1")

    box.publish_soon(events)
    await box.stop()

    assert [e.id for e in publisher.published] == ["co-1:checkout.confirmed"]
    assert await journal.outbox_pending() == 0
    assert hooks.results == [(CONFIRMED, "ok")]


async def test_unconfirmed_events_stay_until_the_relay_sends_them_oldest_first() -> None:
    box, journal, publisher, hooks = outbox()
    publisher.down = True
    for i in range(3):
        box.publish_soon(await decided(journal, box, f"co-{i}"))
    await box.flush()
    assert await journal.outbox_pending() == 3
    assert (CONFIRMED, "error") in hooks.results

    publisher.down = False
    assert await box.relay_once() == 3

    assert [e.id for e in publisher.published] == [f"co-{i}:checkout.confirmed" for i in range(3)]
    assert await journal.outbox_pending() == 0


async def test_the_relay_pages_through_a_long_outbox() -> None:
    box, journal, publisher, _ = outbox(page_size=2)
    for i in range(5):
        await decided(journal, box, f"co-{i}")

    assert await box.relay_once() == 5
    assert len(publisher.published) == 5


async def test_while_the_broker_is_down_new_events_wait_for_the_relay() -> None:
    box, journal, publisher, _ = outbox(relay_interval=60.0)
    publisher.down = True
    box.publish_soon(await decided(journal, box, "co-1"))
    await box.flush()
    publisher.down = False

    box.publish_soon(await decided(journal, box, "co-2"))

    assert box.publishing == 0  # no publish of its own: the broker failed a moment ago
    assert await box.relay_once() == 2
