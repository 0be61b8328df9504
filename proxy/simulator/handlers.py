"""Turning JSON requests into ledger calls, with idempotency by key, in one place.

Upstream modules write plain functions `(body, request, key) -> (status, json)`
that may raise `Rejected`; `action()` wraps them into aiohttp handlers that read
and validate the body, replay or refuse repeated keys, and store first answers.
The function runs without awaiting, so two concurrent requests with one key
cannot both act.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from .idempotency import KEY_HEADER, REPLAYED_HEADER, KeyReused, fingerprint
from .ledger import Ledger, Rejected

Body = TypeVar("Body", bound=BaseModel)
Act = Callable[[Body, web.Request, "str | None"], tuple[int, Any]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

KEYS_IGNORED = web.RequestKey("idempotency_keys_ignored", bool)
"""Set by the fault middleware when the upstream is told not to replay keys."""


def parse_body(raw: bytes, model: type[Body]) -> Body:
    """Validate a JSON body; an empty body counts as `{}` (capture, void need none)."""
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise Rejected(400, "invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        detail = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
        ]
        raise Rejected(400, "invalid_request", detail=detail) from None


def action(upstream: str, ledger: Ledger, model: type[Body], act: Act[Body]) -> Handler:
    """An aiohttp handler for a mutating endpoint, idempotent by the `Idempotency-Key` header."""

    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        key = request.headers.get(KEY_HEADER) or None
        print_ = fingerprint(request.method, request.path_qs, raw)
        # an upstream without key replay still records the key on what it creates,
        # but acts on every request: a re-send creates a second authorization
        replays = not request.get(KEYS_IGNORED, False)
        if key is not None and replays:
            try:
                stored = ledger.idempotency.lookup(upstream, key, print_)
            except KeyReused:
                return web.json_response(
                    {"error": "idempotency_key_reused", "idempotency_key": key}, status=422
                )
            if stored is not None:
                return web.json_response(
                    stored.body, status=stored.status, headers={REPLAYED_HEADER: "true"}
                )
        status, body = run(act, raw, model, request, key)
        if key is not None and replays:
            ledger.idempotency.store(upstream, key, print_, status, body)
        return web.json_response(body, status=status)

    return handle


def query(model: type[Body], act: Act[Body]) -> Handler:
    """An aiohttp handler for an endpoint without side effects (quote, score, validate)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        status, body = run(act, raw, model, request, None)
        return web.json_response(body, status=status)

    return handle


def run(
    act: Act[Body], raw: bytes, model: type[Body], request: web.Request, key: str | None
) -> tuple[int, Any]:
    try:
        return act(parse_body(raw, model), request, key)
    except Rejected as rejected:
        return rejected.status, rejected.body


class NoBody(BaseModel):
    """For endpoints that ignore their body."""

    model_config = {"extra": "ignore"}
