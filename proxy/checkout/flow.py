"""One checkout, from fan-out to a decision that holds: the saga.

1. Journal the checkout before the first upstream call that can act. Read-only
   steps (a quote, a validation: `read_only: true`, never a commit or compensate)
   start before that write, so it is off the answer's path (`CheckoutFlow.begin`).
2. Fan out: every other sync step at once, each through its upstream's pipeline,
   bounded by the checkout's deadline less a reserve kept for step 4.
3. Decide: confirmed when every critical step succeeded. A non-critical step
   that failed takes its fallback and is listed as degraded.
4. Commit (confirmed) or compensate (rejected) every step that acted, each call
   with its own derived Idempotency-Key. A step whose answer was lost is asked
   what it did before it is compensated, because the upstream may have acted:
   by its `resolve` read when it has one (a GET that never acts), else by sending
   its request again with the same key. Whatever still fails goes to the durable
   queue, and the answer is `pending` until the queue has finished it. When every
   one succeeded, the answer goes before the final write, which follows at once.
5. Queue the async steps, follow-ups and notifications; they never delay the
   answer.

The journal, not this coroutine, is the source of truth: a sidecar killed at any
line of this module leaves a record that `recovery` drives to a final state.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from proxy.checkout.answer import (
    CANCELLED,
    RECOVERED,
    Answer,
    StepState,
    build_answer,
    failed_steps,
)
from proxy.checkout.call_order import CallOrder
from proxy.checkout.calls import (
    CallOutcome,
    UpstreamLookup,
    Verdict,
    call_json,
    fallback_body,
    resolution,
)
from proxy.checkout.decided import DecidedRecords
from proxy.checkout.final_writes import FinalWrites
from proxy.checkout.hooks import CheckoutHooks
from proxy.checkout.journal import (
    CheckoutRecord,
    JointJournal,
    Journal,
    JournalUnavailable,
    OutboxEvent,
)
from proxy.checkout.plan import CheckoutPlan, CompiledStep, RenderError, truthy
from proxy.checkout.states import Action, ActionResult, CheckoutState, Decision, StepStatus
from proxy.checkout.templates import RenderContext, StepView
from proxy.events.outbox import EventOutbox
from proxy.idempotency import IdempotencyGuard, KeyIdentity, StoreUnavailable
from proxy.jobs import EnqueuesMany, Job, JobQueue
from proxy.resilience.clock import Clock, monotonic
from proxy.resilience.deadline import Deadline
from proxy.storage.joint import JointInsert

log = logging.getLogger("proxy.checkout")

ACTION_JOB = "checkout_action"
FOLLOWUP_JOB = "checkout_followup"
ASYNC_STEP_JOB = "checkout_async_step"

_NOTHING_TO_SETTLE = frozenset({StepStatus.FALLBACK, StepStatus.SKIPPED, StepStatus.DEFERRED})
"""A step that did not act through its own call has no commit or compensate due."""

# request headers never written to the journal: credentials stay in memory
_PRIVATE_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


def checkout_id_for(key: str, client: str = "") -> str:
    """A stable id per (client, key): a repeat of the request finds the same checkout."""
    digest = hashlib.sha256(f"{client}\x00{key}".encode()).hexdigest()
    return f"chk_{digest[:24]}"


def step_key(base: str, step: str, action: str | None = None) -> str:
    """`<key>:<step>`, `<key>:<step>:commit`, `<key>:<step>:compensate`."""
    return f"{base}:{step}" if action is None else f"{base}:{step}:{action}"


def step_context(context: RenderContext, key_base: str, name: str) -> RenderContext:
    """`context` while step `name`'s own calls render: `{{step.key}}` is its key."""
    return context.for_step(name, step_key(key_base, name))


def context_of(
    record: CheckoutRecord, extra: Mapping[str, StepView] | None = None
) -> RenderContext:
    """What placeholders may read, rebuilt from the journal (also after a restart)."""
    steps = {
        name: StepView(result.get("http_status") or 0, result.get("body"))
        for name, result in record.steps.items()
        if result.get("body") is not None
    }
    if extra:
        steps.update(extra)
    return RenderContext(
        request_body=record.request.get("body"),
        request_headers=record.request.get("headers") or {},
        steps=steps,
        checkout_id=record.id,
        idempotency_key=record.request.get("key_base", record.key),
    )


@dataclass(frozen=True)
class Learned:
    """What asking about a lost step taught: it acted (and answered `body`), or not."""

    acted: bool
    http_status: int = 0
    body: Any = None


@dataclass(frozen=True, slots=True)
class Started:
    """A checkout begun before its journal record is written: when its clock started
    (its deadlines count from there) and its read-only steps, already running.

    Only steps that never act run this early, so "journalled before anything acts"
    holds. A request that does not run the checkout after all (its key replays, is
    in flight elsewhere, or its store is down) `abandon`s them, unread.
    """

    at: float
    steps: Mapping[str, asyncio.Task[StepState]]

    async def under_way(self) -> None:
        """Let the steps send their requests before the caller goes on.

        Tasks run only when their creator yields, and the caller's next work is the
        key's claim and the first record: on PostgreSQL a statement built, quoted and
        sent, which delayed the slowest step's request (the answer's critical path)
        by about 0.4 ms. One turn of the loop runs each step up to its request.
        """
        if self.steps:
            await asyncio.sleep(0)

    def abandon(self) -> None:
        for task in self.steps.values():
            task.cancel()


def _step_name(step: CompiledStep) -> str:
    return step.name


def action_call(step: str, action: Action) -> str:
    """How `CallOrder` names a step's commit or compensate call: `payment:commit`."""
    return f"{step}:{action}"


def _retrieved(task: asyncio.Task[StepState]) -> None:
    """Mark an abandoned early step's error seen: it is not an unhandled one."""
    if not task.cancelled():
        task.exception()


class BadCheckoutRequest(Exception):
    """The client's request cannot be checked out (a placeholder has no value)."""


class CheckoutFlow:
    """Runs checkouts of one plan against the upstreams of the config in force.

    A reload builds a new flow (new plan, new upstreams); checkouts in flight keep
    the one they started with. `running` is shared by every flow of the process:
    the checkouts recovery must leave alone because this process is running them.
    """

    def __init__(
        self,
        plan: CheckoutPlan,
        upstreams: UpstreamLookup,
        journal: Journal,
        queue: JobQueue,
        *,
        hooks: CheckoutHooks | None = None,
        clock: Clock = monotonic,
        wall: Clock = time.time,
        running: set[str] | None = None,
        keys: IdempotencyGuard | None = None,
        events: EventOutbox | None = None,
        final_writes: FinalWrites | None = None,
        decided: DecidedRecords | None = None,
        call_order: CallOrder | None = None,
    ) -> None:
        self.plan = plan
        self.upstreams = upstreams
        self.journal = journal
        self.queue = queue
        # the optional protocols, asked once: isinstance() against a runtime-checkable
        # Protocol walks its members every time (about 8 us in Python 3.11)
        self.joint_journal: JointJournal | None = (
            journal if isinstance(journal, JointJournal) else None
        )
        """The journal when it can commit other stores' statements with its writes."""
        self._enqueues_many: EnqueuesMany | None = (
            queue if isinstance(queue, EnqueuesMany) else None
        )
        self.hooks = hooks or CheckoutHooks()
        self.clock = clock
        self.wall = wall
        self.running: set[str] = running if running is not None else set()
        self.final_writes = final_writes if final_writes is not None else FinalWrites()
        """Final writes of checkouts already answered; shared by the flows of a process,
        like `running`."""
        self.decided = decided if decided is not None else DecidedRecords()
        """Records this process decided, for the render-only jobs they queue; shared
        like `running`."""
        self.call_order = call_order if call_order is not None else CallOrder()
        """What each call took so far, to start the slowest first; shared like `running`."""
        self.keys = keys
        self.events = events

    # -- the request ------------------------------------------------------------

    def new_record(
        self,
        checkout_id: str,
        key: str,
        key_base: str,
        body: Any,
        headers: Mapping[str, str],
        identity: KeyIdentity | None = None,
    ) -> CheckoutRecord:
        """The journal record of a new checkout; `identity` is its idempotency record's."""
        now = self.wall()
        kept = {k: v for k, v in headers.items() if k.lower() not in _PRIVATE_HEADERS}
        request: dict[str, Any] = {"body": body, "headers": kept, "key_base": key_base}
        if identity is not None:
            request["idempotency"] = identity.to_dict()
        return CheckoutRecord(
            id=checkout_id,
            key=key,
            state=CheckoutState.STARTED,
            decision=None,
            request=request,
            steps={},
            pending={},
            response=None,
            trace=self.hooks.trace_context(),
            created_at=now,
            updated_at=now,
            outcome=None,
        )

    def validate(self, record: CheckoutRecord) -> None:
        """Render every sync step's request now, so a bad request fails before any call."""
        context = context_of(record)
        key_base = record.request["key_base"]
        for step in self.plan.sync_steps:
            if not truthy(step.only_if, context):
                continue
            try:
                step.request.render(step_context(context, key_base, step.name))
            except RenderError as exc:
                raise BadCheckoutRequest(str(exc)) from None

    def begin(self, record: CheckoutRecord) -> Started:
        """Start the checkout's clock and its read-only steps, before it is journalled.

        `record` is the validated record about to be written: the steps render from
        its request, exactly as they would from the journalled copy.
        """
        at = self.clock()
        early = self.plan.early_steps
        if not early:
            return Started(at, {})
        context = context_of(record)
        key_base = record.request["key_base"]
        deadline = self._fan_out_deadline(at)
        tasks: dict[str, asyncio.Task[StepState]] = {}
        for step in self.call_order.slowest_first(early, _step_name):
            task = asyncio.create_task(
                self._step(step, context, key_base, deadline), name=step.name
            )
            task.add_done_callback(_retrieved)
            tasks[step.name] = task
        return Started(at, tasks)

    def _fan_out_deadline(self, at: float) -> Deadline:
        return Deadline(at + self.plan.deadline - self.plan.reserve, self.clock)

    async def run(self, record: CheckoutRecord, started: Started | None = None) -> Answer:
        """Run a journalled checkout to its answer, adopting what `begin` started."""
        self.running.add(record.id)
        try:
            return await self._run(record, started or Started(self.clock(), {}))
        finally:
            # one answered before its final write stays ours until that write has ended
            if record.id not in self.final_writes:
                self.running.discard(record.id)

    async def _run(self, record: CheckoutRecord, started: Started) -> Answer:
        overall = Deadline(started.at + self.plan.deadline, self.clock)
        fan_out = self._fan_out_deadline(started.at)
        context = context_of(record)
        key_base = record.request["key_base"]

        steps = await self._fan_out(context, key_base, fan_out, started.steps)
        as_journalled = {n: s.as_dict() for n, s in steps.items()}
        failed = failed_steps(as_journalled, self.plan.critical)
        decision = Decision.REJECTED if failed else Decision.CONFIRMED
        action = decision.action
        work = self._owed(steps, action)
        actions = {
            f"{record.id}:{name}:{action}": {"step": name, "action": action} for name in work
        }
        events = self.decision_events(record.id, decision, as_journalled)
        # One write before anything acts on the decision: the decision, every step's
        # result, the commits or compensations it owes (`pending`) and its events. A
        # crash after it leaves a record recovery finishes from what is written here.
        decided = {
            "state": action.state if actions else CheckoutState.DECIDED,
            "decision": decision,
            "steps": as_journalled,
            "pending": actions,
        }
        try:
            record = await self.journal.update(record.id, events=events, **decided)
        except KeyError:
            record = await self._rewrite_lost(record, decided, events)
        self.publish_soon(events)
        self.hooks.decided(decision)
        # The work the decision owes later (fraud screening, notifications, follow-ups)
        # is queued while the commits or compensations run, off the answer's path; it
        # is durable before the final write below, and a crash before that leaves the
        # record unfinished, so recovery queues it again (fixed job ids: no duplicates).
        statuses = {n: s.status for n, s in steps.items()}
        done, queued = await self._finish(
            record,
            steps,
            context_of(record),
            overall,
            action,
            work,
            beside=lambda: self.enqueue_after(record, statuses),
        )

        answer = build_answer(
            record.id,
            decision,
            {n: s.as_dict() for n, s in steps.items()},
            self.plan.critical,
            pending=list(queued),
            poll=self.poll_path(record.id),
        )
        # One write at the end: what the inline actions did, and the answer (final, with
        # its events, when nothing is owed any more), with the key's answer in the same
        # transaction where the idempotency store shares the journal's database.
        if not queued:
            # Nothing is owed any more, so the answer is settled without that write: it
            # is built from what the decision wrote (every step's result) and from the
            # actions having succeeded, which their upstreams keep under the actions'
            # Idempotency-Keys. A crash before the write lands leaves the record as the
            # decision wrote it; recovery repeats the actions under the same keys (they
            # do nothing twice), finishes the record with this same answer
            # (`build_answer` shows no action bookkeeping) and gives it to the key. So
            # the answer goes now, and the write follows off its path; this process's
            # repeats and polls of the checkout wait for it (`FinalWrites`).
            self.final_writes.start(
                record.id,
                self.conclude(record, done, answer, keep_key=True),
                landed=lambda: self.running.discard(record.id),
            )
            answer.key_kept = self.keeps_key(record)
            return answer
        answer.key_kept = await self.conclude(record, done, answer, keep_key=True)
        # queued only now, so no job can finish the record before this answer is kept
        # (a crash before this line leaves the actions pending: recovery queues them)
        for action_id, info in queued.items():
            await self.queue.enqueue(
                Job(
                    type=ACTION_JOB,
                    id=action_id,
                    payload={"checkout_id": record.id, **info},
                    trace=record.trace,
                )
            )
        return answer

    async def _rewrite_lost(
        self, record: CheckoutRecord, decided: Mapping[str, Any], events: list[OutboxEvent]
    ) -> CheckoutRecord:
        """Write the decided record anew: the one written before the fan-out is gone.

        A store that lost writes it had acknowledged (a Redis failover before the
        replica had them) forgets the checkout, and then nobody would ever settle what
        the fan-out did. This process knows all of it, so the decision is written as
        a new record, and the checkout carries on. When another writer has created the
        record meanwhile, the store is not to be trusted here: 503, and the client's
        retry or recovery finishes that record.
        """
        log.warning("checkout %s: its record was lost by the journal; writing it anew", record.id)
        rebuilt = replace(record, **decided)
        if not await self.journal.create(rebuilt):
            raise JournalUnavailable(
                self.journal.name, "the checkout's record was lost and written by another"
            )
        if events:
            await self.journal.add_events(record.id, events)
        return await self.journal.get(record.id) or rebuilt

    async def settle_key(self, record: CheckoutRecord) -> None:
        """Give a recovered checkout's key its final answer, for the client's retry.

        The request that claimed the key died with its replica; without this a retry
        would get 409 (in progress) until the dead claim's lease ran out. Only for
        checkouts recovery took up: a live request completes its own key.
        """
        identity = record.request.get("idempotency")
        if self.keys is None or record.outcome != RECOVERED or not identity:
            return
        if record.state != CheckoutState.FINAL:
            return
        answer = Answer.from_dict(record.response) if record.response else None
        if answer is None:
            answer = self.final_answer(record)
        try:
            await self.keys.settle(KeyIdentity.from_dict(identity), answer.to_stored())
        except StoreUnavailable as exc:  # the retry waits out the lease instead
            log.warning("checkout %s: its key was not settled: %s", record.id, exc)

    # -- events (an outbox in the journal; see proxy.events.outbox) ------------------

    def decision_events(
        self,
        checkout_id: str,
        decision: Decision,
        steps: Mapping[str, Mapping[str, Any]],
        outcome: str | None = None,
    ) -> list[OutboxEvent]:
        """The events the decision write carries, with the answer as of the decision."""
        if self.events is None:
            return []
        answer = build_answer(
            checkout_id,
            decision,
            steps,
            self.plan.critical,
            poll=self.poll_path(checkout_id),
            outcome=outcome,
        )
        data = dict(answer.body)
        # the compensations of a rejection are still to run: `checkout.compensated` says
        # when they are done, so the decision's event does not claim them yet
        data.pop("compensated", None)
        return self.events.decided(checkout_id, decision == Decision.CONFIRMED, data)

    def publish_soon(self, events: Sequence[OutboxEvent]) -> None:
        """Publish events just written, without the caller waiting for the broker."""
        if self.events is not None and events:
            self.events.publish_soon(events)

    async def finish(self, record: CheckoutRecord, answer: Answer) -> bool:
        """Make the checkout final with `answer` if nothing is pending (True for the
        one caller that did), its final events in the same journal write."""
        events = self.events.finished(record, answer.body) if self.events is not None else []
        done = await self.journal.finish_if_done(
            record.id, response=answer.to_dict(), events=events
        )
        if done:
            self.publish_soon(events)
        return done

    def keeps_key(self, record: CheckoutRecord) -> bool:
        """Whether `conclude(..., keep_key=True)` gives the request's key its answer."""
        return self.keys is not None and bool(record.request.get("idempotency"))

    async def conclude(
        self,
        record: CheckoutRecord,
        done: Mapping[str, tuple[str, dict[str, Any]]],
        answer: Answer,
        *,
        keep_key: bool = False,
    ) -> bool:
        """Settle the inline actions in `done` and keep `answer`, in one journal write:
        final (with its events) when nothing is owed any more.

        With `keep_key`, the request's idempotency key gets `answer` too: in the same
        transaction when the key's store shares the journal's database (`JointJournal`),
        else by a write made at the same time (either order is safe: a key answered
        before its record is final replays what the commits did, which recovery
        finishes; a final record whose key was not answered is found by the retry once
        the claim lapses). True when the key was given the answer here.
        """
        events = self.events.finished(record, answer.body) if self.events is not None else []
        joint: tuple[JointInsert, ...] = ()
        settle: Awaitable[None] | None = None
        if keep_key and self.keys is not None and self.keeps_key(record):
            key = KeyIdentity.from_dict(record.request["idempotency"])
            stored = answer.to_stored()
            statements = self.keys.joint_settle(key, stored)
            journal = self.joint_journal
            if statements and journal is not None and all(journal.accepts(s) for s in statements):
                joint = statements
            else:
                settle = self.keys.settle(key, stored)
        write = self.journal.conclude(
            record.id, done, response=answer.to_dict(), events=events, joint=joint
        )
        if settle is None:
            final = await write
        else:
            final, _ = await asyncio.gather(write, settle)
        if final:
            self.publish_soon(events)
        return bool(joint) or settle is not None

    def poll_path(self, checkout_id: str) -> str:
        return f"{self.plan.path}/{checkout_id}"

    def final_answer(self, record: CheckoutRecord, *, as_answered: bool = True) -> Answer:
        """The answer of a checkout whose owed work is done (or that is being finished).

        `as_answered`: its async steps read `deferred`, as in the answer given at the
        decision, although the journal may hold their results by now: an answer given
        before the final write and one rebuilt after a crash must be the same. Without
        it they show those results (the fraud flag's event carries the verdict)."""
        decision = Decision(record.decision or Decision.REJECTED)
        steps = dict(record.steps)
        if as_answered:
            deferred = StepState(StepStatus.DEFERRED).as_dict()
            steps.update((s.name, deferred) for s in self.plan.async_steps if s.name in steps)
        return build_answer(
            record.id,
            decision,
            steps,
            self.plan.critical,
            pending=list(record.pending),
            poll=self.poll_path(record.id),
            outcome=record.outcome,
        )

    # -- fan-out ----------------------------------------------------------------

    async def _fan_out(
        self,
        context: RenderContext,
        key_base: str,
        deadline: Deadline,
        early: Mapping[str, asyncio.Task[StepState]],
    ) -> dict[str, StepState]:
        """Every sync step at once (those in `early` are running already); the answer
        waits for the slowest, unless it need not.

        Once a critical step has failed (card declined, out of stock, or unavailable
        after its retries), the order is rejected whatever the others answer, so the
        steps still running are cancelled: the answer comes at the failure plus the
        compensation time, not at the slowest step. A cancelled call may have acted
        before it was cut off, so it is failed and `ambiguous`, like any lost call:
        its compensation first learns whether it acted.
        """
        sync = self.plan.sync_steps
        tasks = {
            early.get(step.name)
            or asyncio.create_task(
                self._step(step, context, key_base, deadline), name=step.name
            ): step
            for step in self.call_order.slowest_first(sync, _step_name)
        }
        results: dict[str, StepState | BaseException] = {}
        pending = set(tasks)
        cut_short = ""
        try:
            async with asyncio.timeout(deadline.remaining() + 0.05):
                while pending and not cut_short:
                    done, pending = await asyncio.wait(pending, return_when=FIRST_COMPLETED)
                    for task in done:
                        step = tasks[task]
                        result = results[step.name] = _result_of(task)
                        if step.critical and _failed(result):
                            cut_short = CANCELLED
        except TimeoutError:
            cut_short = "timeout"
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in pending:  # one that finished as it was cancelled keeps its answer
            results[tasks[task].name] = _result_of(task)
        out: dict[str, StepState] = {}
        for step in sync:
            result = results[step.name]
            if isinstance(result, StepState):
                out[step.name] = result
                continue
            if not isinstance(result, asyncio.CancelledError):
                log.warning("checkout step %s ended without a result: %r", step.name, result)
            lost = StepState(StepStatus.FAILED, reason=cut_short or "timeout", ambiguous=True)
            # cut short for a rejected order: no fallback, the call is compensated if it acted
            out[step.name] = (
                lost if cut_short == "cancelled" else self._failed_or_fallback(step, context, lost)
            )
        for step in self.plan.async_steps:
            out[step.name] = StepState(StepStatus.DEFERRED)
        return out

    async def _step(
        self, step: CompiledStep, context: RenderContext, key_base: str, deadline: Deadline
    ) -> StepState:
        return await self.hooks.around_step(
            step.name, step.upstream, lambda: self._run_step(step, context, key_base, deadline)
        )

    async def _run_step(
        self, step: CompiledStep, context: RenderContext, key_base: str, deadline: Deadline
    ) -> StepState:
        if not truthy(step.only_if, context):
            body = step.skipped.render(context) if step.skipped is not None else None
            return StepState(StepStatus.SKIPPED, body=body, reason="skipped")
        upstream = self.upstreams(step.upstream)
        if upstream is None:
            return self._failed_or_fallback(
                step, context, StepState(StepStatus.FAILED, reason="unknown_upstream")
            )
        call = step.request.render(step_context(context, key_base, step.name))
        step_deadline = deadline.within(upstream.config.timeout.total)
        outcome = await call_json(
            upstream,
            call,
            step_key(key_base, step.name),
            step_deadline,
            with_fallback=not step.critical and step.fallback is None,
            hedge=step.hedge,
        )
        self.call_order.observe(step.name, outcome.latency_ms / 1000)
        state = _state_of(outcome)
        if state.status == StepStatus.OK:
            return state
        return self._failed_or_fallback(step, context, state, outcome)

    def _failed_or_fallback(
        self,
        step: CompiledStep,
        context: RenderContext,
        state: StepState,
        outcome: CallOutcome | None = None,
    ) -> StepState:
        """A critical step fails; a non-critical one takes its fallback when it has one."""
        if step.critical:
            return state
        if step.fallback is not None:
            state.status = StepStatus.FALLBACK
            state.body = step.fallback.render(context)
            upstream = self.upstreams(step.upstream)
            if upstream is not None:  # the upstream's own fallbacks count themselves
                upstream.hooks.fallback_served(step.upstream, state.reason, "checkout")
        elif outcome is not None and outcome.fallback is not None:
            state.status = StepStatus.FALLBACK
            state.body = fallback_body(outcome.fallback)
        return state

    # -- commit or compensate -----------------------------------------------------

    def _owed(self, steps: Mapping[str, StepState], action: Action) -> list[str]:
        """The steps that owe `action` (commit or compensate) after the decision."""
        work: list[str] = []
        for name, state in steps.items():
            step = self.plan.steps[name]
            call = step.commit if action == Action.COMMIT else step.compensate
            if call is None or state.status in _NOTHING_TO_SETTLE:
                continue
            if state.status == StepStatus.OK or (action == Action.COMPENSATE and state.ambiguous):
                work.append(name)
        return work

    async def _finish(
        self,
        record: CheckoutRecord,
        steps: dict[str, StepState],
        context: RenderContext,
        deadline: Deadline,
        action: Action,
        work: Sequence[str],
        beside: Callable[[], Coroutine[Any, Any, None]],
    ) -> tuple[dict[str, tuple[str, dict[str, Any]]], dict[str, dict[str, Any]]]:
        """Run the commit or compensate calls of `work` (journalled as pending) inline,
        and `beside` alongside them, waited for too: if it fails, this fails with it.

        `beside` starts after the calls: tasks run in the order they were created, so
        their requests are on the wire before it does anything. The other way round,
        its work on the event loop (a store write's statement built, quoted and sent)
        came first and delayed the answer's last call by as much.

        Returns the actions done (action id -> (step, what the journal records of it)),
        for the caller's final write, and those still owed (id -> description), for the
        caller to queue once the answer is kept. Nothing is written per action: a crash
        before the final write leaves them pending, and recovery repeats them under the
        same Idempotency-Keys, which the upstreams answer without acting twice.
        """

        async def one(name: str) -> tuple[str, str, dict[str, Any] | None]:
            action_id = f"{record.id}:{name}:{action}"
            try:
                result = await self.perform(
                    record, name, action, context, deadline, steps_state=steps
                )
            except Exception:
                log.exception("checkout %s: %s of %s failed", record.id, action, name)
                result = ActionResult.FAILED
            if action == Action.COMPENSATE:
                self.hooks.compensated(name, "queued" if result == ActionResult.FAILED else result)
            if result == ActionResult.FAILED:
                return action_id, name, None
            fields = done_fields(action, result)
            if "status" in fields:
                steps[name].status = fields["status"]
            return action_id, name, fields

        order = self.call_order.slowest_first(work, lambda name: action_call(name, action))
        calls = asyncio.gather(*(one(n) for n in order))
        after = asyncio.create_task(beside(), name=f"beside-actions:{record.id}")
        try:
            results = await calls
        finally:
            if not after.done():
                await asyncio.wait([after])
        after.result()  # a queue that failed fails the checkout (503), as before
        done = {aid: (name, fields) for aid, name, fields in results if fields is not None}
        owed = {
            aid: {"step": name, "action": str(action)}
            for aid, name, fields in results
            if fields is None
        }
        return done, owed

    async def perform(
        self,
        record: CheckoutRecord,
        name: str,
        action: Action,
        context: RenderContext,
        deadline: Deadline,
        steps_state: dict[str, StepState] | None = None,
    ) -> ActionResult:
        """Do one commit or compensate: DONE, NOT_NEEDED (it never acted) or FAILED.

        A step whose answer was lost is asked what it did first (`learn`), and what
        it did is what gets compensated.
        """
        step = self.plan.steps[name]
        call = step.commit if action == Action.COMMIT else step.compensate
        if call is None:
            return ActionResult.NOT_NEEDED
        key_base = record.request["key_base"]
        known = record.steps.get(name, {})
        status, body = known.get("status"), known.get("body")
        if steps_state is not None and name in steps_state:
            status, body = steps_state[name].status, steps_state[name].body
        if status == StepStatus.COMPENSATED or (action == Action.COMMIT and known.get("committed")):
            return ActionResult.DONE
        if action == Action.COMPENSATE and status != StepStatus.OK:
            learned = await self.learn(record, step, context, deadline)
            if learned is None:
                return ActionResult.FAILED
            if not learned.acted:
                return ActionResult.NOT_NEEDED  # it never acted: nothing to undo
            body = learned.body
            await self.journal.set_step(
                record.id, name, {"http_status": learned.http_status, "body": body}
            )
            if steps_state is not None and name in steps_state:  # the answer shows it too
                steps_state[name].http_status = learned.http_status
                steps_state[name].body = body
            context = context.with_step(name, learned.http_status, body)
        upstream = self.upstreams(call.upstream)
        if upstream is None:
            return ActionResult.FAILED
        try:
            rendered = call.render(step_context(context, key_base, name))
        except RenderError as exc:
            log.error("checkout %s: cannot render %s of %s: %s", record.id, action, name, exc)
            return ActionResult.FAILED
        outcome = await call_json(
            upstream,
            rendered,
            step_key(key_base, name, action),
            deadline.within(upstream.config.timeout.total),
        )
        self.call_order.observe(action_call(name, action), outcome.latency_ms / 1000)
        if not outcome.ok:
            # the job's retry says only that it failed; this says why
            log.warning(
                "checkout %s: %s of %s failed: %s %s %.200s",
                record.id,
                action,
                name,
                outcome.reason,
                outcome.http_status or "",
                outcome.body if outcome.body is not None else "",
            )
        return ActionResult.DONE if outcome.ok else ActionResult.FAILED

    async def learn(
        self, record: CheckoutRecord, step: CompiledStep, context: RenderContext, deadline: Deadline
    ) -> Learned | None:
        """Whether a step whose answer was lost acted, and what it did; None: not known yet.

        With `resolve`, only its read is made (no Idempotency-Key, never a re-send): an
        upstream that does not replay keys would act again on a re-send, and the hold
        that then gets voided is still a hold on the customer's card. A failed read is
        "not known yet": the queue asks again later. Without `resolve`, the step's
        request is sent again with its own key: an upstream that replays keys answers
        what it did, or does it now, and either way the result is compensated.
        """
        key_base = record.request["key_base"]
        call = step.resolve or step.request
        upstream = self.upstreams(call.upstream)
        if upstream is None:
            return None
        try:
            rendered = call.render(step_context(context, key_base, step.name))
        except RenderError as exc:
            log.error("checkout %s: cannot render %s: %s", record.id, step.name, exc)
            return None
        outcome = await call_json(
            upstream,
            rendered,
            None if step.resolve else step_key(key_base, step.name),
            deadline.within(upstream.config.timeout.total),
        )
        if step.resolve is None:
            if outcome.refused:
                return Learned(acted=False)
            if not outcome.ok:
                log.warning(
                    "checkout %s: what %s did is not known yet: %s %s",
                    record.id,
                    step.name,
                    outcome.reason,
                    outcome.http_status or "",
                )
                return None
            return Learned(acted=True, http_status=outcome.http_status or 200, body=outcome.body)
        found = resolution(outcome)
        log.info(
            "checkout %s: resolve of %s says %s%s",
            record.id,
            step.name,
            found.verdict,
            f" ({found.why})" if found.why else "",
        )
        if found.verdict == Verdict.UNKNOWN:
            return None
        if found.verdict == Verdict.NOT_ACTED:
            return Learned(acted=False)
        return Learned(acted=True, http_status=outcome.http_status or 200, body=found.body)

    # -- after the decision -------------------------------------------------------

    async def enqueue_after(self, record: CheckoutRecord, statuses: Mapping[str, str]) -> None:
        """Queue the async steps, follow-ups of fallbacks, and notifications (durably).

        Job ids are fixed per checkout, so queueing twice (recovery after a crash) is
        harmless.
        """
        decision = Decision(record.decision or Decision.REJECTED)
        jobs: list[Job] = []
        for step in self.plan.async_steps:
            if decision in step.when:
                jobs.append(
                    Job(
                        type=ASYNC_STEP_JOB,
                        id=f"{record.id}:{step.name}:async",
                        payload={"checkout_id": record.id, "step": step.name},
                        trace=record.trace,
                    )
                )
        if decision == Decision.CONFIRMED:
            for name, status in statuses.items():
                fell_back = self.plan.steps.get(name)
                if (
                    status == StepStatus.FALLBACK
                    and fell_back is not None
                    and fell_back.on_fallback
                ):
                    jobs.append(
                        Job(
                            type=FOLLOWUP_JOB,
                            id=f"{record.id}:{name}:on_fallback",
                            payload={"checkout_id": record.id, "step": name, "kind": "on_fallback"},
                            trace=record.trace,
                        )
                    )
        for notify in self.plan.notify:
            if decision in notify.when:
                jobs.append(
                    Job(
                        type=FOLLOWUP_JOB,
                        id=f"{record.id}:notify:{notify.name}",
                        payload={"checkout_id": record.id, "notify": notify.name, "kind": "notify"},
                        trace=record.trace,
                    )
                )
        if not jobs:
            return
        self.decided.keep(record)  # before the enqueue: a worker may take a job at once
        if len(jobs) == 1:
            await self.queue.enqueue(jobs[0])
        elif self._enqueues_many is not None:
            await self._enqueues_many.enqueue_many(jobs)  # one durable write for all of them
        else:
            await asyncio.gather(*(self.queue.enqueue(job) for job in jobs))


def _result_of(task: asyncio.Task[StepState]) -> StepState | BaseException:
    if task.cancelled():
        return asyncio.CancelledError()
    return task.exception() or task.result()


def _failed(result: StepState | BaseException) -> bool:
    return not isinstance(result, StepState) or result.status == StepStatus.FAILED


def done_fields(action: Action, result: ActionResult) -> dict[str, Any]:
    """What the journal records of a step once its commit or compensate is settled."""
    if action == Action.COMMIT:
        return {"committed": True}
    if result == ActionResult.DONE:
        return {"status": StepStatus.COMPENSATED}
    return {"compensation": ActionResult.NOT_NEEDED}


def _state_of(outcome: CallOutcome) -> StepState:
    return StepState(
        StepStatus.OK if outcome.ok else StepStatus.FAILED,
        http_status=outcome.http_status,
        body=outcome.body,
        attempts=outcome.attempts,
        latency_ms=outcome.latency_ms,
        reason=outcome.reason,
        ambiguous=outcome.ambiguous,
        retry_after=outcome.retry_after,
    )
