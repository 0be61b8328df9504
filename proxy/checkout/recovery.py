"""Drives checkouts that a crash (or a lost job) left unfinished to a final state.

A checkout counts as abandoned once its deadline (plus a margin) has passed and no
request of this process is running it. Recovery learns of unfinished checkouts by
scanning the journal (at start, then every `recovery_interval`, a page at a time
with a cursor), and takes each up when it becomes abandoned: at once if it already
is, else by a timer set for that moment, so a checkout a dead replica left is
rolled back when its deadline passes, not on some later scan. Taking one up: a
checkout never decided is rejected and everything it may have done is compensated
(each step is first asked whether it acted: by its `resolve` read, else by its
request sent again with its own key; see `CheckoutFlow.learn`); a decided one gets
the commit or compensate jobs it still owes. Job ids are the action ids, so a job
already queued is not queued twice, and two replicas taking up the same checkout do
the same work once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from proxy.checkout.answer import RECOVERED
from proxy.checkout.flow import ACTION_JOB, CheckoutFlow
from proxy.checkout.jobs import FlowSource
from proxy.checkout.journal import CheckoutRecord, Cursor, cursor_of
from proxy.checkout.states import Action, CheckoutState, Decision, StepStatus
from proxy.jobs import Job
from proxy.resilience.clock import Clock

log = logging.getLogger("proxy.checkout")

MARGIN = 2.0
"""Seconds past the deadline before a checkout counts as abandoned, not just slow."""

PAGE_SIZE = 500
"""Unfinished records read per journal query; a scan reads page after page."""

REQUEUE_AFTER = 600.0
"""Seconds before a checkout whose jobs were queued is looked at again."""

_NOTHING_TO_UNDO = frozenset({StepStatus.COMPENSATED, StepStatus.FALLBACK, StepStatus.SKIPPED})


def abandoned_at(record: CheckoutRecord, deadline: float, margin: float = MARGIN) -> float:
    """The wall-clock time after which nobody can still be running `record`."""
    return record.created_at + deadline + margin


class Recovery:
    """Finds abandoned checkouts in the journal and drives them to a final state."""

    def __init__(
        self, flow: FlowSource, *, wall: Clock = time.time, margin: float = MARGIN
    ) -> None:
        self._flow = flow
        self._wall = wall
        self._margin = margin
        self._queued: dict[str, float] = {}  # checkout id -> when its owed jobs were queued
        self._timers: dict[str, asyncio.TimerHandle] = {}  # checkout id -> its take-up
        self._taking: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def timers(self) -> int:
        """Checkouts known to be unfinished whose take-up is scheduled."""
        return len(self._timers)

    async def scan_once(self) -> int:
        """Read every unfinished checkout; take up the abandoned ones, time the others.

        Returns how many were taken up. A checkout whose owed jobs are already queued
        (a job dead-lettered, an upstream down for hours) stays unfinished; it is left
        alone for REQUEUE_AFTER so it cannot crowd newer abandoned checkouts out.
        """
        flow = self._flow()
        if flow.events is not None:  # events a crash left unsent go out first
            try:
                await flow.events.relay_once()
            except Exception:
                log.exception("recovery: relaying unsent events failed; the relay retries")
        now = time.monotonic()
        self._queued = {k: t for k, t in self._queued.items() if now - t < REQUEUE_AFTER}
        found = 0
        after: Cursor | None = None
        while True:
            page = await flow.journal.unfinished(older_than=0.0, limit=PAGE_SIZE, after=after)
            wall = self._wall()
            for record in page:
                if record.id in flow.running or record.id in self._queued:
                    continue
                due = abandoned_at(record, flow.plan.deadline, self._margin)
                if due > wall:
                    self._schedule(record.id, due - wall)
                    continue
                found += 1
                await self._take(flow, record)
            if len(page) < PAGE_SIZE or self._stop.is_set():
                return found
            after = cursor_of(page[-1])

    def _schedule(self, checkout_id: str, delay: float) -> None:
        if checkout_id in self._timers or self._stop.is_set():
            return
        loop = asyncio.get_running_loop()
        self._timers[checkout_id] = loop.call_later(delay, self._due, checkout_id)

    def _due(self, checkout_id: str) -> None:
        self._timers.pop(checkout_id, None)
        task = asyncio.get_running_loop().create_task(
            self._take_by_id(checkout_id), name=f"recover:{checkout_id}"
        )
        self._taking.add(task)
        task.add_done_callback(self._taking.discard)

    async def _take_by_id(self, checkout_id: str) -> None:
        """A timer came due: take the checkout up unless it finished meanwhile."""
        try:
            flow = self._flow()
            record = await flow.journal.get(checkout_id)
        except Exception:
            log.exception("recovery of checkout %s: cannot read it; next scan retries", checkout_id)
            return
        if record is None or record.state == CheckoutState.FINAL:
            return
        if record.id in flow.running or record.id in self._queued:
            return
        await self._take(flow, record)

    async def _take(self, flow: CheckoutFlow, record: CheckoutRecord) -> None:
        self._queued[record.id] = time.monotonic()
        try:
            await self.recover(record)
        except Exception:
            log.exception("recovery of checkout %s failed; next scan retries", record.id)
            self._queued.pop(record.id, None)

    async def recover(self, record: CheckoutRecord) -> None:
        flow = self._flow()
        journal, plan = flow.journal, flow.plan
        if record.decision is None:
            log.warning("checkout %s was left undecided (crash?): rejecting it", record.id)
            events = flow.decision_events(
                record.id, Decision.REJECTED, record.steps, outcome=RECOVERED
            )
            record = await journal.update(
                record.id,
                decision=Decision.REJECTED,
                state=CheckoutState.DECIDED,
                outcome=RECOVERED,
                events=events,
            )
            flow.publish_soon(events)
        elif record.outcome != RECOVERED:
            # its request is gone too: whoever finishes it settles the client's key
            record = await journal.update(record.id, outcome=RECOVERED)
        # what the decision owes beyond commit/compensate (async steps, follow-ups,
        # notifications); fixed job ids make a second queueing a no-op
        await flow.enqueue_after(
            record,
            {name: (result or {}).get("status", "") for name, result in record.steps.items()},
        )
        action = Decision(record.decision or Decision.REJECTED).action
        owed: dict[str, dict[str, Any]] = {}
        for step in plan.sync_steps:
            call = step.commit if action == Action.COMMIT else step.compensate
            if call is None:
                continue
            known = record.steps.get(step.name, {})
            status = known.get("status")
            if action == Action.COMMIT:
                if status != StepStatus.OK or known.get("committed"):
                    continue
            elif status in _NOTHING_TO_UNDO or known.get("compensation"):
                continue
            elif status == StepStatus.FAILED and not known.get("ambiguous"):
                continue  # a clean refusal or a call that never left: nothing happened
            owed[f"{record.id}:{step.name}:{action}"] = {"step": step.name, "action": action}
        new = {k: v for k, v in owed.items() if k not in record.pending}
        if new:
            await journal.add_pending(record.id, new)
        reread = await journal.get(record.id)
        if reread is None:
            return
        record = reread
        if not record.pending:
            if await flow.finish(record, flow.final_answer(record)):
                final = await journal.get(record.id)
                if final is not None:
                    await flow.settle_key(final)
            return
        await journal.update(record.id, state=action.state)
        for action_id, info in record.pending.items():
            await flow.queue.enqueue(
                Job(
                    type=ACTION_JOB,
                    id=action_id,
                    payload={"checkout_id": record.id, **info},
                    trace=record.trace,
                )
            )

    def start(self, interval: float) -> None:
        async def loop() -> None:
            while not self._stop.is_set():
                try:
                    await self.scan_once()
                except Exception:
                    log.exception("checkout recovery scan failed")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._stop.wait()

        self._task = asyncio.create_task(loop(), name="checkout-recovery")

    async def stop(self) -> None:
        self._stop.set()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._task is not None:
            await self._task
            self._task = None
        taking = list(self._taking)
        await asyncio.gather(*taking, return_exceptions=True)
