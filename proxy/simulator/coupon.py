"""The coupon service: is this code valid for this amount, and what does it take off?

An unknown code is `200 {"valid": false}`, not a 404: "no such coupon" is a
business answer, and an upstream that answers it is healthy. A 404 would look
like a failure to breakers, retries and fallbacks.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .config import CouponConfig
from .handlers import query
from .ledger import Ledger


class ValidateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    code: str
    amount: StrictInt = Field(ge=0, description="cents the discount applies to")


def routes(name: str, options: CouponConfig, ledger: Ledger) -> list[web.RouteDef]:
    """The coupon API: `POST /validate`. Codes match exactly, case included."""
    del name

    def validate(body: ValidateBody, _: web.Request, __: str | None) -> tuple[int, Any]:
        ledger.calls["coupon_validations"] += 1
        coupon = options.coupons.get(body.code)
        if coupon is None:
            return 200, {
                "code": body.code,
                "valid": False,
                "discount": 0,
                "total": body.amount,
                "reason": "unknown_code",
            }
        if coupon.percent is not None:
            discount = body.amount * coupon.percent // 100
        else:
            discount = coupon.amount_off or 0
        discount = int(min(discount, body.amount))
        return 200, {
            "code": body.code,
            "valid": True,
            "discount": discount,
            "total": body.amount - discount,
        }

    return [web.post("/validate", query(ValidateBody, validate))]
