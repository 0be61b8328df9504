"""The checkout's durable jobs: unfinished commits and compensations, follow-ups,
async steps and notifications, run by the job queue's workers.

Each job reloads its checkout from the journal, so it runs the same after a
restart, in another replica, or in a separate `checkout-sidecar worker`. Every
call it makes carries a key derived from the checkout's, so a job that runs twice
(the queue delivers at least once) acts once.
"""

from __future__ import annotations

import logging
from typing import Any

from proxy.checkout.calls import call_json
from proxy.checkout.flow import (
    FAILED,
    CheckoutFlow,
    context_of,
    done_fields,
    rejection,
    step_key,
)
from proxy.checkout.plan import CompiledCall, RenderError
from proxy.checkout.templates import RenderContext
from proxy.jobs import Job, PermanentFailure
from proxy.resilience.deadline import Deadline

log = logging.getLogger("proxy.checkout")


def final_response(record: Any) -> dict[str, Any]:
    """The answer of a checkout whose queued work is done: pending becomes the decision.

    A rejection is 409 when a critical step refused (a 4xx), 503 when it was
    unavailable, as if the checkout had finished inline.
    """
    response = dict(record.response or {})
    body = dict(response.get("body") or {})
    body["status"] = record.decision
    body.pop("pending", None)
    body.pop("poll", None)
    body["steps"] = record.steps
    if record.decision == "confirmed":
        return {"status": 200, "body": body, "headers": {}}
    failed = body.get("failed_steps") or []
    reasons = {n: (record.steps.get(n) or {}).get("reason", "") for n in failed}
    status, error, headers = rejection(failed, reasons, [])
    body["compensated"] = True
    body["error"] = error
    return {"status": status, "body": body, "headers": headers}


class CheckoutJobs:
    """Handlers for the checkout's job types, over the flow in force."""

    def __init__(self, flow: CheckoutFlow) -> None:
        self.flow = flow

    def _deadline(self, upstream: Any = None) -> Deadline:
        """The checkout's deadline for a job's call, no longer than the upstream's own."""
        deadline = Deadline.after(self.flow.plan.deadline, self.flow.clock)
        return deadline if upstream is None else deadline.within(upstream.config.timeout.total)

    async def _record(self, checkout_id: str) -> Any:
        record = await self.flow.journal.get(checkout_id)
        if record is None:
            raise PermanentFailure(f"checkout {checkout_id} is not in the journal")
        return record

    async def action(self, job: Job) -> None:
        """A commit or compensate that did not finish inline."""
        checkout_id, step, action = (
            job.payload["checkout_id"],
            job.payload["step"],
            job.payload["action"],
        )
        record = await self._record(checkout_id)
        action_id = job.id
        if action_id not in record.pending:
            return  # already settled (a repeat delivery)
        result = await self.flow.perform(record, step, action, context_of(record), self._deadline())
        if result == FAILED:
            raise RuntimeError(f"{action} of {step} for {checkout_id} did not succeed yet")
        if action == "compensate" and self.flow.on_compensated is not None:
            self.flow.on_compensated(step, result)
        remaining = await self.flow.journal.resolve_pending(
            checkout_id, action_id, step=step, step_fields=done_fields(action, result)
        )
        if remaining == 0:
            record = await self._record(checkout_id)
            await self.flow.journal.finish_if_done(checkout_id, response=final_response(record))
            log.info("checkout %s final: %s", checkout_id, record.decision)

    async def followup(self, job: Job) -> None:
        """`on_fallback` calls of a step, or a notification: a sequence of named calls."""
        record = await self._record(job.payload["checkout_id"])
        plan = self.flow.plan
        if job.payload.get("kind") == "notify":
            name = job.payload["notify"]
            matches = [n for n in plan.notify if n.name == name]
            if not matches:
                raise PermanentFailure(f"no notify named {name!r} in the config")
            calls, prefix = matches[0].calls, f"notify:{name}"
        else:
            step = job.payload["step"]
            if step not in plan.steps:
                raise PermanentFailure(f"no step named {step!r} in the config")
            if record.state != "final":
                # a follow-up corrects what the commit did (refund part of a capture):
                # it waits until the checkout's commits are done
                raise RuntimeError(f"checkout {record.id} is not final yet ({record.state})")
            calls, prefix = plan.steps[step].on_fallback, f"{step}:on_fallback"
        await self._run_calls(record, calls, prefix)

    async def async_step(self, job: Job) -> None:
        """An async step (fraud screening): its call, then the callback when flagged."""
        record = await self._record(job.payload["checkout_id"])
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
            rendered = step.request.render(context)
        except RenderError as exc:
            raise PermanentFailure(str(exc)) from None
        outcome = await call_json(
            upstream, rendered, step_key(key_base, name), self._deadline(upstream)
        )
        if outcome.refused:
            raise PermanentFailure(f"{name} answered {outcome.http_status}: {outcome.body}")
        if not outcome.ok:
            raise RuntimeError(f"{name}: {outcome.reason}")
        await self.flow.journal.set_step(
            record.id,
            name,
            {"status": "ok", "http_status": outcome.http_status, "body": outcome.body},
        )
        if step.callback is None or not _flagged(step.flag_if, outcome.body):
            return
        context = context.with_step(name, outcome.http_status or 200, outcome.body)
        await self._call(step.callback, context, step_key(key_base, name, "callback"))

    async def _run_calls(self, record: Any, calls: tuple[CompiledCall, ...], prefix: str) -> None:
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
