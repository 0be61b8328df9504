"""The shipping service: a price quote per service level, no side effects.

Non-critical in the checkout: when it fails, the sidecar falls back to standard
shipping, so the quote always offers "standard" too.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .config import ShippingConfig
from .handlers import query
from .ledger import Ledger, Rejected


class QuoteItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    qty: StrictInt = Field(default=1, gt=0)


class QuoteBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    items: list[QuoteItem] = Field(default_factory=list)
    address: dict[str, Any] | None = None
    service: str = "standard"


def routes(name: str, options: ShippingConfig, ledger: Ledger) -> list[web.RouteDef]:
    """The shipping API: `POST /quote`."""
    del name

    def quote(body: QuoteBody, _: web.Request, __: str | None) -> tuple[int, Any]:
        extra_items = max(0, sum(item.qty for item in body.items) - 1)
        prices = {
            "express": options.express_cents + options.per_item_cents * extra_items,
            "standard": options.standard_cents + options.per_item_cents * extra_items,
        }
        if body.service not in prices:
            raise Rejected(400, "unknown_service", service=body.service, known=sorted(prices))
        ledger.calls["quotes"] += 1
        return 200, {
            "options": [{"service": s, "price": p} for s, p in prices.items()],
            "service": body.service,
            "price": prices[body.service],
        }

    return [web.post("/quote", query(QuoteBody, quote))]
