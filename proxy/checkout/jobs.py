"""The checkout's durable jobs: unfinished commits and compensations, follow-ups,
async steps and notifications, run by the job queue's workers.

Each job reloads its checkout from the journal, so it runs the same after a
restart, in another replica, or in a separate `checkout-sidecar worker`; a job that
only renders from what the decision fixed (an async step, a notification) takes the
record from the process that decided it when that is this one (`DecidedRecords`). Every
call it makes carries a key derived from the checkout's, so a job that runs twice
(the queue delivers at least once) acts once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from proxy.checkout.calls import call_json
from proxy.checkout.flow import CheckoutFlow, context_of, done_fields, step_context, step_key
from proxy.checkout.journal import CheckoutRecord
from proxy.checkout.plan import CompiledCall, RenderError
from proxy.checkout.states import Action, ActionResult, CheckoutState
from proxy.checkout.templates import RenderContext
from proxy.jobs import Job, PermanentFailure
from proxy.resilience.deadline import Deadline
from proxy.upstreams import Upstream

log = logging.getLogger("proxy.checkout")

FlowSource = Callable[[], CheckoutFlow]
"""The checkout flow of the config in force: jobs run on the current plan and upstreams."""


class CheckoutJobs:
    """Handlers for the checkout's job types, over the flow in force when each job runs."""

    def __init__(self, flow: FlowSource) -> None:
        self._flow = flow

    @property
    def flow(self) -> CheckoutFlow:
        return self._flow()

    def _deadline(self, upstream: Upstream | None = None) -> Deadline:
        """The checkout's deadline for a job's call, no longer than the upstream's own."""
        deadline = Deadline.after(self.flow.plan.deadline, self.flow.clock)
        return deadline if upstream is None else deadline.within(upstream.config.timeout.total)

    async def _record(self, checkout_id: str) -> CheckoutRecord:
        record = await self.flow.journal.get(checkout_id)
        if record is None:
            raise PermanentFailure(f"checkout {checkout_id} is not in the journal")
        return record

    async def _decided_record(self, checkout_id: str) -> CheckoutRecord:
        """The record as its decision wrote it or later: enough for an async step's
        request and a notification's calls, which the config lets read only the
        request and the sync steps' results (`composite_errors`), fixed by then."""
        return self.flow.decided.get(checkout_id) or await self._record(checkout_id)

    async def action(self, job: Job) -> None:
        """A commit or compensate that did not finish inline."""
        flow = self.flow
        checkout_id, step = job.payload["checkout_id"], job.payload["step"]
        action = Action(job.payload["action"])
        record = await self._record(checkout_id)
        action_id = job.id
        if action_id not in record.pending:
            return  # already settled (a repeat delivery)
        result = await flow.perform(record, step, action, context_of(record), self._deadline())
        if result == ActionResult.FAILED:
            raise RuntimeError(f"{action} of {step} for {checkout_id} did not succeed yet")
        if action == Action.COMPENSATE:
            flow.hooks.compensated(step, result)
        remaining = await flow.journal.resolve_pending(
            checkout_id, action_id, step=step, step_fields=done_fields(action, result)
        )
        if remaining == 0:
            record = await self._record(checkout_id)
            answer = flow.final_answer(record)
            if await flow.finish(record, answer):
                log.info("checkout %s final: %s", checkout_id, record.decision)
                final = await flow.journal.get(checkout_id)
                if final is not None:
                    await flow.settle_key(final)

    async def followup(self, job: Job) -> None:
        """`on_fallback` calls of a step, or a notification: a sequence of named calls."""
        checkout_id = job.payload["checkout_id"]
        plan = self.flow.plan
        if job.payload.get("kind") == "notify":
            record = await self._decided_record(checkout_id)
            name = job.payload["notify"]
            matches = [n for n in plan.notify if n.name == name]
            if not matches:
                raise PermanentFailure(f"no notify named {name!r} in the config")
            calls, prefix = matches[0].calls, f"notify:{name}"
        else:
            record = await self._record(checkout_id)  # its state decides: read afresh
            step = job.payload["step"]
            if step not in plan.steps:
                raise PermanentFailure(f"no step named {step!r} in the config")
            if record.state != CheckoutState.FINAL:
                # a follow-up corrects what the commit did (refund part of a capture):
                # it waits until the checkout's commits are done
                raise RuntimeError(f"checkout {record.id} is not final yet ({record.state})")
            calls, prefix = plan.steps[step].on_fallback, f"{step}:on_fallback"
        await self._run_calls(record, calls, prefix)

    async def async_step(self, job: Job) -> None:
        """An async step (fraud screening): its call, then the callback when flagged."""
        record = await self._decided_record(job.payload["checkout_id"])
        name = job.payload["step"]
        step = self.flow.plan.steps.get(name)
        if step is None:
            raise PermanentFailure(f"no step named {name!r} in the config")
        context = context_of(record)
        upstream = self.flow.upstreams(step.upstream)
        if upstream is None:
            raise PermanentFailure(f"no upstream named {step.upstream!r}")
        key_base = record.request["key_base"]
        try:
            rendered = step.request.render(step_context(context, key_base, name))
        except RenderError as exc:
            raise PermanentFailure(str(exc)) from None
        outcome = await call_json(
            upstream, rendered, step_key(key_base, name), self._deadline(upstream)
        )
        if outcome.refused:
            raise PermanentFailure(f"{name} answered {outcome.http_status}: {outcome.body}")
        if not outcome.ok:
            raise RuntimeError(f"{name}: {outcome.reason}")
        try:
            await self.flow.journal.set_step(
                record.id,
                name,
                {"status": "ok", "http_status": outcome.http_status, "body": outcome.body},
            )
        except KeyError:
            # rendered from the record this process decided, which the journal has
            # since lost: as when `_record` finds none, a retry would not find it either
            raise PermanentFailure(f"checkout {record.id} is not in the journal") from None
        if step.callback is None or not _flagged(step.flag_if, outcome.body):
            return
        context = context.with_step(name, outcome.http_status or 200, outcome.body)
        await self._call(step.callback, context, step_key(key_base, name, "callback"))
        await self._fraud_flagged(record.id)

    async def _fraud_flagged(self, checkout_id: str) -> None:
        """The callback acted on a flagged order: tell other services (after the call,
        so an event never reports a callback that did not happen; a crash between the
        two repeats the job, whose callback is idempotent by its key)."""
        flow = self.flow
        if flow.events is None:
            return
        record = await self._record(checkout_id)
        answer = flow.final_answer(record, as_answered=False)  # with the verdict
        events = flow.events.fraud_flagged(checkout_id, answer.body)
        if events:
            await flow.journal.add_events(checkout_id, events)
            flow.publish_soon(events)

    async def _run_calls(
        self, record: CheckoutRecord, calls: tuple[CompiledCall, ...], prefix: str
    ) -> None:
        context = context_of(record)
        key_base = record.request["key_base"]
        for i, call in enumerate(calls):
            if not call.wanted(context):
                continue
            body = await self._call(call, context, f"{key_base}:{prefix}:{i}")
            if call.name:
                context = context.with_step(call.name, 200, body)

    async def _call(self, call: CompiledCall, context: RenderContext, key: str) -> Any:
        upstream = self.flow.upstreams(call.upstream)
        if upstream is None:
            raise PermanentFailure(f"no upstream named {call.upstream!r}")
        try:
            rendered = call.render(context)
        except RenderError as exc:
            raise PermanentFailure(str(exc)) from None
        outcome = await call_json(upstream, rendered, key, self._deadline(upstream))
        if outcome.refused:
            raise PermanentFailure(
                f"{call.upstream} answered {outcome.http_status}: {outcome.body}"
            )
        if not outcome.ok:
            raise RuntimeError(f"{call.upstream}: {outcome.reason}")
        return outcome.body


def _flagged(flag_if: dict[str, list[Any]], body: Any) -> bool:
    if not flag_if:
        return True
    if not isinstance(body, dict):
        return False
    return any(body.get(field) in values for field, values in flag_if.items())
