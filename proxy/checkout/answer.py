"""The checkout's answer, built in one place from the steps as the journal holds them.

A checkout is answered inline when it finishes within its request, later (to a
poll or a client's retry) when the queue or recovery finishes it, and again from
the idempotency record to every repeat. Each answer has the same body (`checkout_id`,
`status`, `decision`, `degraded`, `steps`, and for a rejection `failed_steps`,
`compensated` and an `error` sentence naming what failed), because all of them are
built here from the same inputs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.checkout.states import Decision, StepStatus
from proxy.idempotency.store import StoredResponse

_BOOKKEEPING = frozenset({"committed", "compensation", "retry_after"})
"""What the journal keeps of a step that its answer does not show: whether its commit
or compensation is done (an answer given before the final write could not show it, and
one built after it must read the same) and its upstream's Retry-After hint (the answer's
header)."""

RECOVERED = "recovered"
"""The journal's `outcome` of a checkout that recovery took up."""

CANCELLED = "cancelled"
"""The `reason` of a step cut off because another critical step had failed: it did not
fail by itself, so it is not among the `failed_steps`."""


@dataclass
class StepState:
    """A step's result as the saga tracks it during a checkout."""

    status: StepStatus
    http_status: int | None = None
    body: Any = None
    attempts: int = 0
    latency_ms: float = 0.0
    reason: str = ""
    ambiguous: bool = False
    retry_after: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The step as the journal keeps it and the answer shows it."""
        out: dict[str, Any] = {
            "status": self.status,
            "http_status": self.http_status,
            "attempts": self.attempts,
            "latency_ms": self.latency_ms,
            "body": self.body,
        }
        if self.reason and self.reason != "ok":
            out["reason"] = self.reason
        if self.ambiguous:
            out["ambiguous"] = True
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        return out


@dataclass
class Answer:
    """The HTTP answer of a checkout."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    key_kept: bool = field(default=False, compare=False)
    """The request's idempotency key was given this answer with the checkout's final
    write, so the guard need not store it again."""

    def to_dict(self) -> dict[str, Any]:
        """As the journal keeps it (`CheckoutRecord.response`)."""
        return {"status": self.status, "body": self.body, "headers": self.headers}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Answer:
        return cls(int(data["status"]), dict(data["body"]), dict(data.get("headers") or {}))

    def to_stored(self) -> StoredResponse:
        """As the idempotency record keeps it, for replay to a repeat of the request."""
        headers = [("Content-Type", "application/json"), *self.headers.items()]
        return StoredResponse(self.status, headers, json.dumps(self.body).encode())


def failed_steps(steps: Mapping[str, Mapping[str, Any]], critical: Collection[str]) -> list[str]:
    """The critical steps that failed, also once a lost call among them was compensated.

    A step that acted and was undone only because another failed has no `reason`, and
    one cut off by the fan-out has `cancelled`; one whose call failed keeps the reason
    it failed with after its compensation.
    """
    out = []
    for name, step in steps.items():
        if name not in critical:
            continue
        status, reason = step.get("status"), step.get("reason", "ok")
        if reason == CANCELLED:
            continue
        if status == StepStatus.FAILED or (status == StepStatus.COMPENSATED and reason != "ok"):
            out.append(name)
    return out


def build_answer(
    checkout_id: str,
    decision: Decision,
    steps: Mapping[str, Mapping[str, Any]],
    critical: Collection[str],
    *,
    pending: Collection[str] = (),
    poll: str = "",
    outcome: str | None = None,
) -> Answer:
    """The answer for a checkout: 200 confirmed, 202 pending, or a rejection.

    `steps` are as the journal keeps them (`StepState.as_dict`); `critical` names
    the critical steps; `pending` the commits or compensations still owed (the
    answer is then 202 with `poll`); `outcome` is the journal's (`recovered` for
    a checkout a crash left undecided). The same record gives the same answer
    before and after its actions are settled, and after a crash.
    """
    failed = failed_steps(steps, critical)
    degraded = sorted(n for n, s in steps.items() if s.get("status") == StepStatus.FALLBACK)
    degraded += sorted(
        n for n, s in steps.items() if s.get("status") == StepStatus.FAILED and n not in critical
    )
    body: dict[str, Any] = {
        "checkout_id": checkout_id,
        "status": "pending" if pending else str(decision),
        "decision": str(decision),
        "degraded": degraded,
        "steps": {n: _shown(s) for n, s in steps.items()},
    }
    if failed:
        body["failed_steps"] = failed
    if pending:
        body["pending"] = sorted(pending)
        body["poll"] = poll
        return Answer(202, body)
    if decision == Decision.CONFIRMED:
        return Answer(200, body)
    status, error, headers = rejection(
        failed,
        {n: str(steps[n].get("reason", "")) for n in failed},
        [steps[n].get("retry_after") for n in failed],
        outcome,
    )
    body["compensated"] = True
    body["error"] = error
    return Answer(status, body, headers)


def _shown(step: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in step.items() if k not in _BOOKKEEPING}


def rejection(
    failed: list[str],
    reasons: Mapping[str, str],
    retry_after: Collection[float | None] = (),
    outcome: str | None = None,
) -> tuple[int, str, dict[str, str]]:
    """Status, sentence and headers of a rejected checkout.

    A 4xx is the upstream saying no (409, the order cannot succeed as it is);
    anything else is unavailability (503, with Retry-After when an upstream gave
    one). A checkout a crash interrupted before its decision names no step: the
    sentence says what happened instead.
    """
    refused = [n for n in failed if reasons.get(n) == "refused"]
    if refused:
        return 409, f"{', '.join(refused)} refused the order; every side effect was undone", {}
    headers: dict[str, str] = {}
    hints = [seconds for seconds in retry_after if seconds]
    if hints:
        headers["Retry-After"] = str(max(1, math.ceil(max(hints))))
    if failed:
        subject = f"{', '.join(failed)} unavailable"
    elif outcome == RECOVERED:
        subject = "the checkout was interrupted before its decision (the sidecar stopped)"
    else:
        subject = "the checkout could not be completed"
    return 503, f"{subject}; every side effect was undone", headers
