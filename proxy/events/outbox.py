"""The events outbox: a checkout's events are never lost and never delay its answer.

1. Each event is written to the journal by the same atomic write as the record
   change it reports (the decision, the finish), so neither exists without the other.
2. Right after that write it is published in a background task: the checkout's
   answer does not wait for the broker.
3. The broker's publisher confirm marks it sent (`Journal.mark_events_sent`).
4. Until then the relay publishes it again: every `relay_interval`, oldest first, a
   bounded page at a time; recovery runs the relay too at each scan.

So a crash or a broker outage delays events but loses none; a consumer may see one
twice (a confirm lost with the connection) and dedupes by the event's `id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.checkout.journal import CheckoutRecord, Journal, OutboxEvent
from proxy.events.cloudevents import checkout_event
from proxy.events.publisher import EventPublisher
from proxy.resilience.clock import Clock

log = logging.getLogger("proxy.events")

CONFIRMED = "checkout.confirmed"
REJECTED = "checkout.rejected"
COMPENSATED = "checkout.compensated"
FRAUD_FLAGGED = "checkout.fraud_flagged"
ALL_TYPES = (CONFIRMED, REJECTED, COMPENSATED, FRAUD_FLAGGED)

PAGE_SIZE = 100
"""Unsent events read (and published together) per relay step."""

MAX_PAGES = 50
"""Pages one relay round publishes at most, so one round stays bounded in time."""


@dataclass(frozen=True)
class EventOptions:
    """What to publish, and how often to try again; plain data from the `events:` section."""

    types: frozenset[str] = frozenset(ALL_TYPES)
    source: str = "urn:checkout-sidecar"
    relay_interval: float = 2.0
    page_size: int = PAGE_SIZE


class EventHooks:
    """What the outbox reports; no-ops here, metrics subscribe by overriding."""

    def published(self, event_type: str, result: str) -> None:
        """An event was published (`ok`: confirmed) or not (`error`)."""


class EventOutbox:
    """Builds a checkout's events, publishes them after their write, relays the rest."""

    def __init__(
        self,
        journal: Journal,
        publisher: EventPublisher,
        options: EventOptions | None = None,
        *,
        hooks: EventHooks | None = None,
        wall: Clock = time.time,
    ) -> None:
        self.journal = journal
        self.publisher = publisher
        self.options = options or EventOptions()
        self.hooks = hooks or EventHooks()
        self._wall = wall
        self._in_flight: set[str] = set()  # published now by a background task
        self._tasks: set[asyncio.Task[None]] = set()
        self._relay: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._down_until = 0.0  # after a failure, new events wait for the relay

    # -- the events of a checkout -------------------------------------------------

    def _events(self, event_type: str, checkout_id: str, data: Any) -> list[OutboxEvent]:
        if event_type not in self.options.types:
            return []
        return [
            checkout_event(
                event_type, checkout_id, data, source=self.options.source, wall=self._wall()
            )
        ]

    def decided(self, checkout_id: str, confirmed: bool, answer: Any) -> list[OutboxEvent]:
        """The events of a decision: `checkout.confirmed` or `checkout.rejected`."""
        return self._events(CONFIRMED if confirmed else REJECTED, checkout_id, answer)

    def finished(self, record: CheckoutRecord, answer: Any) -> list[OutboxEvent]:
        """The events of becoming final: `checkout.compensated` for a rejected checkout
        (its compensations, if it owed any, are all done)."""
        if record.decision != "rejected":
            return []
        return self._events(COMPENSATED, record.id, answer)

    def fraud_flagged(self, checkout_id: str, answer: Any) -> list[OutboxEvent]:
        return self._events(FRAUD_FLAGGED, checkout_id, answer)

    # -- publishing ---------------------------------------------------------------

    def publish_soon(self, events: Sequence[OutboxEvent]) -> None:
        """Publish events just written, in the background; the relay has them otherwise.

        While the broker is known to be down (a publish failed within the last
        `relay_interval`), this leaves them to the relay rather than have every
        checkout wait out a connect of its own.
        """
        fresh = [event for event in events if event.id not in self._in_flight]
        if not fresh or self._stop.is_set() or time.monotonic() < self._down_until:
            return
        task = asyncio.get_running_loop().create_task(self._publish_now(fresh), name="events")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish_now(self, events: Sequence[OutboxEvent]) -> None:
        try:
            await self.publish(events)
        except Exception:  # the journal is down: the events stay in the outbox
            log.exception("events: publishing %d events failed; the relay retries", len(events))

    async def publish(self, events: Sequence[OutboxEvent]) -> set[str]:
        """Publish `events`, mark the confirmed ones sent; returns their ids."""
        ids = {event.id for event in events}
        self._in_flight |= ids
        try:
            confirmed = await self.publisher.publish(events)
            if confirmed:
                await self.journal.mark_events_sent(sorted(confirmed))
        finally:
            self._in_flight -= ids
        for event in events:
            self.hooks.published(event.type, "ok" if event.id in confirmed else "error")
        if len(confirmed) < len(ids):
            self._down_until = time.monotonic() + self.options.relay_interval
        return confirmed

    @property
    def publishing(self) -> int:
        """Background publishes under way."""
        return len(self._tasks)

    async def flush(self) -> None:
        """Wait for the background publishes under way (tests, and a graceful stop)."""
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def relay_once(self) -> int:
        """Publish unsent events, oldest first, a page at a time; returns how many
        were confirmed. Stops at a page not wholly confirmed (the broker is down)."""
        sent = 0
        for _ in range(MAX_PAGES):
            page = await self.journal.unsent_events(limit=self.options.page_size)
            todo = [event for event in page if event.id not in self._in_flight]
            if not todo:
                return sent
            confirmed = await self.publish(todo)
            sent += len(confirmed)
            if len(confirmed) < len(todo) or len(page) < self.options.page_size:
                return sent
        return sent

    async def pending(self) -> int:
        """Events in the outbox, not yet confirmed (read at scrape time)."""
        return await self.journal.outbox_pending()

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Run the relay every `relay_interval` (at once first: a restart's leftovers)."""

        async def loop() -> None:
            while not self._stop.is_set():
                try:
                    await self.relay_once()
                except Exception:
                    log.exception("events relay failed; it tries again")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.options.relay_interval):
                        await self._stop.wait()

        if self._relay is None:
            self._relay = asyncio.get_running_loop().create_task(loop(), name="events-relay")

    async def stop(self, wait: float = 5.0) -> None:
        """Stop the relay, give background publishes `wait` seconds, close the publisher.
        What is still unsent stays in the outbox for the next start."""
        self._stop.set()
        if self._relay is not None:
            await self._relay
            self._relay = None
        tasks: Collection[asyncio.Task[None]] = list(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=wait)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self.publisher.close()
