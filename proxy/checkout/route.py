"""`POST /checkout` and `GET /checkout/{id}`: the composite checkout over HTTP.

The route owns the HTTP rules (JSON body, the Idempotency-Key that a checkout
requires, replays and conflicts through the idempotency guard) and hands the
journalled checkout to the flow. A request that fails validation is answered
400 and its key is given back, as Stripe does: nothing ran, so nothing is kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from aiohttp import web

from proxy.checkout.flow import BadCheckoutRequest, CheckoutFlow, checkout_id_for
from proxy.checkout.recovery import Recovery
from proxy.errors import json_error
from proxy.idempotency import IdempotencyGuard, NotRun, StoredResponse, StoreUnavailable


def _stored(status: int, body: Any, headers: dict[str, str] | None = None) -> StoredResponse:
    out = [("Content-Type", "application/json")]
    out += list((headers or {}).items())
    return StoredResponse(status, out, json.dumps(body).encode())


class CheckoutRoute:
    def __init__(
        self,
        flow: CheckoutFlow,
        recovery: Recovery,
        guard: Callable[[], IdempotencyGuard | None],
        *,
        key_header: str,
        scope_header: str | None,
        on_result: Callable[[str, float], None] | None = None,
    ) -> None:
        self.flow = flow
        self.recovery = recovery
        self.guard = guard
        self.key_header = key_header
        self.scope_header = scope_header
        self.on_result = on_result or (lambda result, seconds: None)

    async def post(self, request: web.Request) -> web.StreamResponse:
        started = self.flow.clock()
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            # aiohttp's own answer is text/plain: the sidecar's errors are JSON
            return self._refused(
                json_error(413, exc.text or "the body is too large", "payload_too_large"), started
            )
        try:
            body = json.loads(raw) if raw else None
        except ValueError as exc:
            return self._refused(
                json_error(400, f"the body is not JSON: {exc}", "bad_request"), started
            )
        if not isinstance(body, dict):
            return self._refused(
                json_error(400, "the body must be a JSON object", "bad_request"), started
            )
        key = request.headers.get(self.key_header)
        if not key:
            return self._refused(
                json_error(
                    400,
                    f"a checkout requires an {self.key_header} header",
                    "idempotency_key_missing",
                    header=self.key_header,
                ),
                started,
            )
        guard = self.guard()
        if guard is None:
            return json_error(503, "the idempotency store is not open", "store_unavailable")
        client = request.headers.get(self.scope_header, "") if self.scope_header else ""
        # the client part is quoted so ("a:b", "c") and ("a", "b:c") never share keys
        key_base = f"{quote(client, safe='')}:{key}" if client else key

        async def run() -> StoredResponse:
            return await self._run(key, key_base, client, body, request)

        try:
            response = await guard.handle(request, raw, "checkout", run)
        except NotRun as refused:
            return self._refused(refused.response, started)
        self.on_result(_result_of(response), self.flow.clock() - started)
        return response

    async def _run(
        self, key: str, key_base: str, client: str, body: Any, request: web.Request
    ) -> StoredResponse:
        flow = self.flow
        checkout_id = checkout_id_for(key, client)
        try:
            existing = await flow.journal.get(checkout_id)
            if existing is not None:
                return await self._resume(existing)
            record = flow.new_record(checkout_id, key, key_base, body, request.headers)
            try:
                flow.validate(record)
            except BadCheckoutRequest as exc:
                raise NotRun(json_error(400, str(exc), "bad_request")) from None
            if not await flow.journal.create(record):
                existing = await flow.journal.get(checkout_id)
                assert existing is not None
                return await self._resume(existing)
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
        answer = await flow.run(record)
        return _stored(answer.status, answer.body, answer.headers)

    async def _resume(self, record: Any) -> StoredResponse:
        """The key's checkout exists (its first request crashed or its claim lapsed)."""
        if record.state == "final" and record.response:
            response = record.response
            return _stored(response["status"], response["body"], response.get("headers"))
        if record.id not in self.flow.running:
            await self.recovery.recover(record)
        # the answer's usual fields (README: always checkout_id, status, decision,
        # degraded, steps), from what the journal knows so far
        steps = record.steps
        plan = self.flow.plan.steps
        body = {
            "checkout_id": record.id,
            "status": "pending",
            "decision": record.decision,
            "degraded": sorted(n for n, s in steps.items() if s.get("status") == "fallback")
            + sorted(
                n
                for n, s in steps.items()
                if s.get("status") == "failed" and n in plan and not plan[n].critical
            ),
            "steps": steps,
            "poll": f"{self.flow.plan.path}/{record.id}",
        }
        return _stored(202, body)

    async def get(self, request: web.Request) -> web.StreamResponse:
        checkout_id = request.match_info["id"]
        try:
            record = await self.flow.journal.get(checkout_id)
        except StoreUnavailable as exc:
            return json_error(
                503, f"the checkout journal {exc.store} is unavailable", "store_unavailable"
            )
        if record is None:
            return json_error(404, f"no checkout {checkout_id!r}", "unknown_checkout")
        final = record.state == "final"
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

    def _refused(self, response: web.Response, started: float) -> web.Response:
        self.on_result("bad_request" if response.status == 400 else "refused", 0.0)
        return response


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
