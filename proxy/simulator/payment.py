"""The payment provider: authorize, then capture or void; refund what was captured.

`GET /authorizations?idempotency_key=K` says what an authorize under K did without
acting (the checkout's `resolve` read): the authorization, or 404.

Its state machine is the one the checkout saga must respect (authorized ->
captured | voided; captured -> refunded), so an illegal move is a 409 here just
as it would be at a real provider, and a test sees the saga's mistakes.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .config import PaymentConfig
from .handlers import action, query
from .ledger import Ledger, Rejected

DECLINED_CARD = "declined"


class AuthorizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    amount: StrictInt = Field(gt=0, description="cents")
    currency: str = Field(min_length=1)
    customer: str | None = None
    card: str | None = None


class AmountBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    amount: StrictInt | None = Field(default=None, gt=0, description="cents; default: all")


def routes(name: str, options: PaymentConfig, ledger: Ledger) -> list[web.RouteDef]:
    """The payment API, bound to the shared ledger."""

    def authorize(body: AuthorizeBody, _: web.Request, key: str | None) -> tuple[int, Any]:
        over_limit = options.decline_over is not None and body.amount > options.decline_over
        if body.card == DECLINED_CARD or over_limit:
            ledger.decline(body.amount, body.currency, body.customer, key)
            raise Rejected(402, "card_declined")
        return 201, ledger.authorize(body.amount, body.currency, body.customer, key).public()

    def capture(body: AmountBody, request: web.Request, key: str | None) -> tuple[int, Any]:
        return 200, ledger.capture(request.match_info["id"], body.amount, key).public()

    def void(_: AmountBody, request: web.Request, key: str | None) -> tuple[int, Any]:
        return 200, ledger.void(request.match_info["id"], key).public()

    def refund(body: AmountBody, request: web.Request, key: str | None) -> tuple[int, Any]:
        return 200, ledger.refund(request.match_info["id"], body.amount, key).public()

    def read(_: AmountBody, request: web.Request, __: str | None) -> tuple[int, Any]:
        return 200, ledger.payment(request.match_info["id"]).public()

    def by_key(_: AmountBody, request: web.Request, __: str | None) -> tuple[int, Any]:
        """What an authorize under `?idempotency_key=` did (the checkout's resolve read):
        the authorization as /authorize answered it, or 404 when none was created."""
        key = request.query.get("idempotency_key")
        return 200, ledger.found_by_key(key, ledger.authorizations_by_key(key or "")).public()

    return [
        web.post("/authorize", action(name, ledger, AuthorizeBody, authorize)),
        web.post("/payments/{id}/capture", action(name, ledger, AmountBody, capture)),
        web.post("/payments/{id}/void", action(name, ledger, AmountBody, void)),
        web.post("/payments/{id}/refund", action(name, ledger, AmountBody, refund)),
        web.get("/payments/{id}", query(AmountBody, read)),
        web.get("/authorizations", query(AmountBody, by_key)),
    ]
