"""The fraud screen: a score from 0 to 1 and a verdict, the same every time for the same order.

The score is a hash of the request body, so runs are reproducible without any
randomness; `customers:` in the config pins a verdict when a test or demo needs a
reject or a review on purpose.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from .config import FraudConfig
from .handlers import query
from .ledger import Ledger

PINNED_SCORES = {"approve": 0.01, "review": 0.75, "reject": 0.99}


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    customer: str | None = None


def score_of(body: dict[str, Any]) -> float:
    """A stable number in [0, 1) from the body's JSON, keys in any order."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(canonical).digest()[:8], "big") / 2**64


def routes(name: str, options: FraudConfig, ledger: Ledger) -> list[web.RouteDef]:
    """The fraud API: `POST /score`."""
    del name

    def verdict_for(score: float) -> str:
        if score >= options.reject_at:
            return "reject"
        return "review" if score >= options.review_at else "approve"

    def score(body: ScoreBody, _: web.Request, __: str | None) -> tuple[int, Any]:
        ledger.calls["fraud_scores"] += 1
        pinned = options.customers.get(body.customer or "")
        if pinned is not None:
            return 200, {"score": PINNED_SCORES[pinned], "verdict": pinned}
        value = round(score_of(body.model_dump(mode="json")), 6)
        return 200, {"score": value, "verdict": verdict_for(value)}

    return [web.post("/score", query(ScoreBody, score))]
