"""The inventory service: reserve stock for an order, then commit or release it.

A reservation takes all its items or none, so an out-of-stock 409 leaves the
stock untouched; release gives the stock back, which is how a test proves the
saga's compensation really ran. `GET /reservations?idempotency_key=K` says what a
reserve under K did without acting: the reservation, or 404.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .config import InventoryConfig
from .handlers import NoBody, action, query
from .ledger import Ledger


class Item(BaseModel):
    model_config = ConfigDict(extra="ignore")

    sku: str = Field(min_length=1)
    qty: StrictInt = Field(gt=0)


class ReserveBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    items: list[Item] = Field(min_length=1)


def routes(name: str, options: InventoryConfig, ledger: Ledger) -> list[web.RouteDef]:
    """The inventory API; stock per sku comes from the ledger (configured in `options`)."""
    del options  # stock lives in the ledger, set up from the same config

    def reserve(body: ReserveBody, _: web.Request, key: str | None) -> tuple[int, Any]:
        items = [item.model_dump() for item in body.items]
        return 201, ledger.reserve(items, key).public()

    def release(_: NoBody, request: web.Request, key: str | None) -> tuple[int, Any]:
        return 200, ledger.release(request.match_info["id"], key).public()

    def commit(_: NoBody, request: web.Request, key: str | None) -> tuple[int, Any]:
        return 200, ledger.commit(request.match_info["id"], key).public()

    def read(_: NoBody, request: web.Request, __: str | None) -> tuple[int, Any]:
        return 200, ledger.reservation(request.match_info["id"]).public()

    def by_key(_: NoBody, request: web.Request, __: str | None) -> tuple[int, Any]:
        """What a reserve under `?idempotency_key=` did: the reservation, or 404."""
        key = request.query.get("idempotency_key")
        return 200, ledger.found_by_key(key, ledger.reservations_by_key(key or "")).public()

    def stock(_: NoBody, request: web.Request, __: str | None) -> tuple[int, Any]:
        sku = request.match_info["sku"]
        return 200, {"sku": sku, "available": ledger.available(sku)}

    return [
        web.post("/reservations", action(name, ledger, ReserveBody, reserve)),
        web.post("/reservations/{id}/release", action(name, ledger, NoBody, release)),
        web.post("/reservations/{id}/commit", action(name, ledger, NoBody, commit)),
        web.get("/reservations", query(NoBody, by_key)),
        web.get("/reservations/{id}", query(NoBody, read)),
        web.get("/stock/{sku}", query(NoBody, stock)),
    ]
