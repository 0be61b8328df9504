"""Drives checkouts that a crash (or a lost job) left unfinished to a final state.

At start and then periodically, journal records that are not final and older than
the checkout's deadline are taken up: a checkout that was never decided is
rejected and everything it may have done is compensated (each step is first asked
whether it acted: by its `resolve` read, else by its request sent again with its own
key; see `CheckoutFlow.learn`); a decided one gets the commit
or compensate jobs it still owes. Job ids are the action ids, so a job that is
already queued is not queued twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from proxy.checkout.answer import RECOVERED
from proxy.checkout.flow import ACTION_JOB
from proxy.checkout.jobs import FlowSource
from proxy.checkout.journal import CheckoutRecord
from proxy.checkout.states import Action, CheckoutState, Decision, StepStatus
from proxy.jobs import Job

log = logging.getLogger("proxy.checkout")

MARGIN = 2.0
"""Seconds past the deadline before a checkout counts as abandoned, not just slow."""

SCAN_LIMIT = 1000

_NOTHING_TO_UNDO = frozenset({StepStatus.COMPENSATED, StepStatus.FALLBACK, StepStatus.SKIPPED})
REQUEUE_AFTER = 600.0
"""Seconds before a checkout whose jobs were queued is looked at again."""


class Recovery:
    """Finds abandoned checkouts in the journal and drives them to a final state."""

    def __init__(self, flow: FlowSource) -> None:
        self._flow = flow
        self._queued: dict[str, float] = {}  # checkout id -> when its owed jobs were queued
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def scan_once(self) -> int:
        """Take up every abandoned checkout once; returns how many were found.

        A checkout whose owed jobs are already queued (a job dead-lettered, an
        upstream down for hours) stays unfinished; it is left alone for
        REQUEUE_AFTER so it cannot crowd newer abandoned checkouts out of a scan.
        """
        flow = self._flow()
        records = await flow.journal.unfinished(
            older_than=flow.plan.deadline + MARGIN, limit=SCAN_LIMIT
        )
        now = time.monotonic()
        self._queued = {k: t for k, t in self._queued.items() if now - t < REQUEUE_AFTER}
        found = 0
        for record in records:
            if record.id in flow.running or record.id in self._queued:
                continue
            self._queued[record.id] = now
            found += 1
            try:
                await self.recover(record)
            except Exception:
                log.exception("recovery of checkout %s failed; next scan retries", record.id)
        return found

    async def recover(self, record: CheckoutRecord) -> None:
        flow = self._flow()
        journal, plan = flow.journal, flow.plan
        if record.decision is None:
            log.warning("checkout %s was left undecided (crash?): rejecting it", record.id)
            record = await journal.update(
                record.id,
                decision=Decision.REJECTED,
                state=CheckoutState.DECIDED,
                outcome=RECOVERED,
            )
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
            await journal.finish_if_done(record.id, response=flow.final_answer(record).to_dict())
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
        if self._task is not None:
            await self._task
            self._task = None
