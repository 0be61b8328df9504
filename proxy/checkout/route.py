"""`POST /checkout` and `GET /checkout/{id}`: the composite checkout over HTTP.

The route owns the HTTP rules (JSON body, the Idempotency-Key that a checkout
requires, replays and conflicts through the idempotency guard) and hands the
journalled checkout to the flow. A request that fails validation is answered
400 and its key is given back, as Stripe does: nothing ran, so nothing is kept.

Where the stores can (the idempotency store and the journal in one PostgreSQL
database), the key's claim and the checkout's first journal record are one
transaction: the record is built and validated before the claim and handed to the
guard as a `JointInsert`, so no crash between the two can leave a claimed key without
its checkout. Other stores claim first and journal inside `run`, as before.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from aiohttp import web

from proxy.checkout.answer import build_answer
from proxy.checkout.flow import BadCheckoutRequest, CheckoutFlow, Started, checkout_id_for
from proxy.checkout.hooks import CheckoutSpan
from proxy.checkout.journal import CheckoutRecord
from proxy.checkout.recovery import Recovery
from proxy.checkout.states import CheckoutState, Decision
from proxy.errors import json_error
from proxy.idempotency import (
    IdempotencyGuard,
    KeptResponse,
    NotRun,
    StoredResponse,
    StoreUnavailable,
)
from proxy.runtime import RuntimeSource
from proxy.storage.joint import JointInsert


def _stored(status: int, body: Any, headers: dict[str, str] | None = None) -> StoredResponse:
    out = [("Content-Type", "application/json")]
    out += list((headers or {}).items())
    return StoredResponse(status, out, json.dumps(body).encode())


def _not_started() -> web.Response:
    return json_error(
        503,
        "the sidecar is still opening its stores",
        "store_unavailable",
        headers={"Retry-After": "1"},
    )


class CheckoutRoute:
    """`POST /checkout` and `GET /checkout/{id}` over the runtime in force."""

    def __init__(self, source: RuntimeSource, recovery: Recovery) -> None:
        self.source = source
        self.recovery = recovery

    async def post(self, request: web.BaseRequest) -> web.StreamResponse:
        runtime = self.source.runtime
        flow, guard = runtime.flow, runtime.guard
        if flow is None or guard is None:
            return _not_started()
        begun = flow.clock()
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            # aiohttp's own answer is text/plain: the sidecar's errors are JSON
            return self._refused(
                flow, json_error(413, exc.text or "the body is too large", "payload_too_large")
            )
        try:
            body = json.loads(raw) if raw else None
        except ValueError as exc:
            return self._refused(
                flow, json_error(400, f"the body is not JSON: {exc}", "bad_request")
            )
        if not isinstance(body, dict):
            return self._refused(
                flow, json_error(400, "the body must be a JSON object", "bad_request")
            )
        section = runtime.config.idempotency
        key = request.headers.get(section.header)
        if not key:
            return self._refused(
                flow,
                json_error(
                    400,
                    f"a checkout requires an {section.header} header",
                    "idempotency_key_missing",
                    header=section.header,
                ),
            )
        scope_header = section.scope_header
        client = request.headers.get(scope_header, "") if scope_header else ""
        # the client part is quoted so ("a:b", "c") and ("a", "b:c") never share keys
        key_base = f"{quote(client, safe='')}:{key}" if client else key

        identity = guard.identity(request, raw, "checkout")
        checkout_id = checkout_id_for(key, client)
        # a repeat of a checkout answered here moments ago is replayed, not refused as
        # in progress while that checkout's final write is still in flight
        await flow.final_writes.wait(checkout_id)
        # built and validated before the claim: a new checkout's first record can then
        # be committed with it, and its read-only steps start before either is written
        record = flow.new_record(checkout_id, key, key_base, body, request.headers, identity)
        invalid: BadCheckoutRequest | None = None
        try:
            flow.validate(record)
        except BadCheckoutRequest as exc:
            invalid = exc
        joint = _joint_insert(flow, guard, record) if invalid is None else None

        with flow.hooks.checkout_span(checkout_id) as span:
            started = flow.begin(record) if invalid is None else None

            async def run(journalled: bool) -> StoredResponse:
                if journalled and joint is not None:  # committed with the claim
                    return await self._start(flow, record, started, span)
                return await self._run(flow, record, invalid, started, span)

            try:
                if started is not None:
                    await started.under_way()
                response = await guard.handle_joint(request, raw, "checkout", run, joint=joint)
            except NotRun as refused:
                span.ended(_refusal(refused.response))
                return self._refused(flow, refused.response)
            finally:
                if started is not None:  # not run after all: their answers go unread
                    started.abandon()
            result = _result_of(response)
            span.ended(result)
        flow.hooks.answered(result, flow.clock() - begun)
        return response

    async def _run(
        self,
        flow: CheckoutFlow,
        record: CheckoutRecord,
        invalid: BadCheckoutRequest | None,
        started: Started | None,
        span: CheckoutSpan,
    ) -> StoredResponse:
        """Journal the checkout, then run it; or resume the key's checkout if it exists.

        Create first: a new checkout (the usual case) costs one journal write, and only
        a key whose checkout exists already (a crashed or lapsed first request) reads
        it; a request that does not validate is refused as before.
        """
        try:
            if invalid is not None:
                existing = await flow.journal.get(record.id)
                if existing is not None:
                    return await self._resume(flow, existing)
                raise NotRun(json_error(400, str(invalid), "bad_request")) from None
            if not await flow.journal.create(record):
                existing = await flow.journal.get(record.id)
                assert existing is not None
                return await self._resume(flow, existing)
        except StoreUnavailable as exc:
            raise NotRun(
                json_error(
                    503,
                    f"the checkout journal {exc.store} is unavailable, so nothing was run",
                    "store_unavailable",
                    store=exc.store,
                    headers={"Retry-After": "1"},
                )
            ) from None
        return await self._start(flow, record, started, span)

    @staticmethod
    async def _start(
        flow: CheckoutFlow, record: CheckoutRecord, started: Started | None, span: CheckoutSpan
    ) -> StoredResponse:
        """Run a checkout whose record is journalled, to its answer."""
        try:
            answer = await flow.run(record, started)
        except StoreUnavailable as exc:
            # A store failed mid-checkout (Redis failing over, say): what ran is in the
            # journal and recovery finishes it; the key is released, so a retry with it
            # resumes this checkout instead of waiting out the claim.
            raise NotRun(
                json_error(
                    503,
                    f"the {exc.kind} {exc.store} became unavailable during the checkout; "
                    "what it did is finished by recovery, so retry with the same key",
                    "store_unavailable",
                    store=exc.store,
                    headers={"Retry-After": "1"},
                )
            ) from None
        span.answered(answer)
        stored = _stored(answer.status, answer.body, answer.headers)
        if answer.key_kept:  # the flow's final write gave the key this answer
            return KeptResponse(stored.status, stored.headers, stored.body)
        return stored

    async def _resume(self, flow: CheckoutFlow, record: CheckoutRecord) -> StoredResponse:
        """The key's checkout exists (its first request crashed or its claim lapsed).

        One this process is not running is taken up by recovery now, so the answer is
        the checkout's final one when recovery could finish it at once, and otherwise
        the usual pending answer (README: always checkout_id, status, decision,
        degraded, steps), built like every other answer.
        """
        if record.state != CheckoutState.FINAL and record.id not in flow.running:
            await self.recovery.recover(record)
            record = await flow.journal.get(record.id) or record
        if record.state == CheckoutState.FINAL and record.response:
            response = record.response
            return _stored(response["status"], response["body"], response.get("headers"))
        if record.decision is None:  # still fanning out in this process
            answer = build_answer(
                record.id,
                Decision.CONFIRMED,
                record.steps,
                flow.plan.critical,
                pending=["decision"],
                poll=flow.poll_path(record.id),
            )
            answer.body["decision"] = None
        else:
            answer = flow.final_answer(record)
        return _stored(answer.status, answer.body, answer.headers)

    async def get(self, request: web.BaseRequest, checkout_id: str) -> web.StreamResponse:
        flow = self.source.runtime.flow
        if flow is None:
            return _not_started()
        await flow.final_writes.wait(checkout_id)  # a checkout just answered reads final
        try:
            record = await flow.journal.get(checkout_id)
        except StoreUnavailable as exc:
            return json_error(
                503, f"the checkout journal {exc.store} is unavailable", "store_unavailable"
            )
        if record is None:
            return json_error(404, f"no checkout {checkout_id!r}", "unknown_checkout")
        final = record.state == CheckoutState.FINAL
        body = {
            "checkout_id": record.id,
            "state": record.state,
            "decision": record.decision,
            "status": record.decision if final else "pending",
            "steps": record.steps,
            "pending": sorted(record.pending),
            "outcome": record.outcome,
        }
        return web.json_response(body)

    @staticmethod
    def _refused(flow: CheckoutFlow, response: web.Response) -> web.Response:
        flow.hooks.answered(_refusal(response), 0.0)
        return response


def _joint_insert(
    flow: CheckoutFlow, guard: IdempotencyGuard, record: CheckoutRecord
) -> JointInsert | None:
    """The new checkout's journal insert, when the guard can commit it with the claim.

    None when the journal or the idempotency store cannot (other backends, or two
    databases): the checkout then claims first and journals inside `run`, exactly
    as without this.
    """
    journal = flow.joint_journal
    if journal is None:
        return None
    insert = journal.joint_create(record)
    return insert if guard.accepts(insert) else None


def _refusal(response: web.StreamResponse) -> str:
    """The `result` label of a request refused before its checkout ran."""
    return "bad_request" if response.status == 400 else "refused"


def _result_of(response: web.StreamResponse) -> str:
    """The `result` label: a refusal (409) and an unavailable upstream (503) apart."""
    if response.headers.get("Idempotent-Replayed") == "true":
        return "replayed"
    error = response.headers.get("X-Sidecar-Error", "")
    if error.startswith("idempotency_"):
        return "idempotency_conflict"
    if error:  # the sidecar refused before running (store unavailable)
        return "unavailable" if response.status == 503 else "error"
    return {
        200: "confirmed",
        202: "pending",
        409: "rejected",
        503: "unavailable",
    }.get(response.status, "error")
