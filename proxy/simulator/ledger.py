"""The simulator's memory: what was authorized, captured, reserved; read back by tests.

One `Ledger` is shared by all five upstreams so a test or benchmark can check a
whole checkout at once: no authorization left without a capture or a void, no
customer charged twice, no reservation left hanging. State transitions live
here, with no HTTP in sight; the handlers only translate JSON.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from .idempotency import IdempotencyStore

# payment: authorized -> captured | voided; captured -> refunded
PAYMENT_TRANSITIONS: dict[str, dict[str, str]] = {
    "capture": {"authorized": "captured"},
    "void": {"authorized": "voided"},
    "refund": {"captured": "refunded"},
}
# inventory: reserved -> released | committed
RESERVATION_TRANSITIONS: dict[str, dict[str, str]] = {
    "release": {"reserved": "released"},
    "commit": {"reserved": "committed"},
}


class Rejected(Exception):
    """A request the upstream refuses: carries the HTTP status and the JSON error body."""

    def __init__(self, status: int, error: str, /, **detail: Any) -> None:
        super().__init__(error)
        self.status = status
        self.body = {"error": error, **detail}


@dataclass(slots=True)
class Authorization:
    id: str
    amount: int
    currency: str
    customer: str | None
    status: str = "authorized"
    captured_amount: int = 0
    refunded_amount: int = 0
    idempotency_key: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        """The body the payment API answers with."""
        return {
            "id": self.id,
            "status": self.status,
            "amount": self.amount,
            "currency": self.currency,
            "captured_amount": self.captured_amount,
            "refunded_amount": self.refunded_amount,
        }


@dataclass(slots=True)
class Reservation:
    id: str
    items: list[dict[str, Any]]
    status: str = "reserved"
    idempotency_key: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "items": self.items}


class Ledger:
    """Payment and inventory state plus a count of every other business call."""

    def __init__(self, stock: dict[str, int] | None = None, default_stock: int = 1_000_000) -> None:
        self._initial_stock = dict(stock or {})
        self.default_stock = default_stock
        self.reset()

    def reset(self) -> None:
        """Back to the configured start: no authorizations, no reservations, full stock."""
        self.authorizations: dict[str, Authorization] = {}
        self.captures: list[dict[str, Any]] = []
        self.voids: list[dict[str, Any]] = []
        self.refunds: list[dict[str, Any]] = []
        self.declines: list[dict[str, Any]] = []
        self.reservations: dict[str, Reservation] = {}
        self.stock: dict[str, int] = dict(self._initial_stock)
        self.calls: Counter[str] = Counter()  # quotes, coupon validations, fraud scores
        self.idempotency = IdempotencyStore()
        # what the sidecar told the app (order flags, confirmation emails), by topic
        self.notifications: list[dict[str, Any]] = []

    # -- payment -----------------------------------------------------------------

    def authorize(
        self, amount: int, currency: str, customer: str | None, key: str | None
    ) -> Authorization:
        auth = Authorization(_new_id("auth"), amount, currency, customer, idempotency_key=key)
        auth.history.append({"action": "authorize", "amount": amount, "idempotency_key": key})
        self.authorizations[auth.id] = auth
        return auth

    def authorizations_by_key(self, key: str) -> list[Authorization]:
        """Every authorization created under `key`: one, or none, unless keys were ignored."""
        return [a for a in self.authorizations.values() if a.idempotency_key == key]

    def decline(self, amount: int, currency: str, customer: str | None, key: str | None) -> None:
        self.declines.append(
            {"amount": amount, "currency": currency, "customer": customer, "idempotency_key": key}
        )

    def payment(self, auth_id: str) -> Authorization:
        auth = self.authorizations.get(auth_id)
        if auth is None:
            raise Rejected(404, "not_found", id=auth_id)
        return auth

    def capture(self, auth_id: str, amount: int | None, key: str | None) -> Authorization:
        """Capture all of the authorization, or `amount` of it (a partial capture)."""
        auth = self.payment(auth_id)
        amount = auth.amount if amount is None else amount
        if auth.status == "authorized" and amount > auth.amount:
            raise Rejected(409, "amount_exceeds_authorized", id=auth_id, authorized=auth.amount)
        self._move_payment(auth, "capture", amount, key)
        auth.captured_amount = amount
        self.captures.append({"authorization": auth_id, "amount": amount, "idempotency_key": key})
        return auth

    def void(self, auth_id: str, key: str | None) -> Authorization:
        auth = self.payment(auth_id)
        self._move_payment(auth, "void", auth.amount, key)
        self.voids.append({"authorization": auth_id, "amount": auth.amount, "idempotency_key": key})
        return auth

    def refund(self, auth_id: str, amount: int | None, key: str | None) -> Authorization:
        """Refund what is left, or `amount` of it; a partial refund stays `captured`."""
        auth = self.payment(auth_id)
        refundable = auth.captured_amount - auth.refunded_amount
        amount = refundable if amount is None else amount
        if auth.status == "captured" and amount > refundable:
            raise Rejected(409, "amount_exceeds_captured", id=auth_id, refundable=refundable)
        if amount < refundable and auth.status == "captured":
            auth.history.append({"action": "refund", "amount": amount, "idempotency_key": key})
        else:
            self._move_payment(auth, "refund", amount, key)
        auth.refunded_amount += amount
        self.refunds.append({"authorization": auth_id, "amount": amount, "idempotency_key": key})
        return auth

    @staticmethod
    def _move_payment(auth: Authorization, action: str, amount: int, key: str | None) -> None:
        target = PAYMENT_TRANSITIONS[action].get(auth.status)
        if target is None:
            raise Rejected(409, "invalid_state", id=auth.id, status=auth.status, action=action)
        auth.status = target
        auth.history.append({"action": action, "amount": amount, "idempotency_key": key})

    # -- inventory ---------------------------------------------------------------

    def available(self, sku: str) -> int:
        return self.stock.get(sku, self.default_stock)

    def reserve(self, items: list[dict[str, Any]], key: str | None) -> Reservation:
        """All items or none: the first sku short of stock refuses the whole reservation."""
        wanted: Counter[str] = Counter()
        for item in items:
            wanted[item["sku"]] += item["qty"]
        for sku, qty in wanted.items():
            if self.available(sku) < qty:
                raise Rejected(
                    409, "out_of_stock", sku=sku, requested=qty, available=self.available(sku)
                )
        for sku, qty in wanted.items():
            self.stock[sku] = self.available(sku) - qty
        reservation = Reservation(_new_id("res"), items, idempotency_key=key)
        reservation.history.append({"action": "reserve", "idempotency_key": key})
        self.reservations[reservation.id] = reservation
        return reservation

    def reservations_by_key(self, key: str) -> list[Reservation]:
        """Every reservation created under `key`: one, or none, unless keys were ignored."""
        return [r for r in self.reservations.values() if r.idempotency_key == key]

    def reservation(self, res_id: str) -> Reservation:
        reservation = self.reservations.get(res_id)
        if reservation is None:
            raise Rejected(404, "not_found", id=res_id)
        return reservation

    def release(self, res_id: str, key: str | None) -> Reservation:
        """Give the stock back."""
        reservation = self._move_reservation(res_id, "release", key)
        for item in reservation.items:
            self.stock[item["sku"]] = self.available(item["sku"]) + item["qty"]
        return reservation

    def commit(self, res_id: str, key: str | None) -> Reservation:
        return self._move_reservation(res_id, "commit", key)

    def _move_reservation(self, res_id: str, action: str, key: str | None) -> Reservation:
        reservation = self.reservation(res_id)
        target = RESERVATION_TRANSITIONS[action].get(reservation.status)
        if target is None:
            raise Rejected(
                409, "invalid_state", id=res_id, status=reservation.status, action=action
            )
        reservation.status = target
        reservation.history.append({"action": action, "idempotency_key": key})
        return reservation

    # -- read back ---------------------------------------------------------------

    @staticmethod
    def found_by_key(key: str | None, found: list[Any]) -> Any:
        """The one thing created under `key`, for a `?idempotency_key=` read.

        404 when nothing was, so a caller learns that a lost request never acted; 409
        when several were (an upstream that ignored keys acted more than once): no
        single answer would be true. 400 without a key.
        """
        if not key:
            raise Rejected(400, "idempotency_key_required")
        if not found:
            raise Rejected(404, "not_found", idempotency_key=key)
        if len(found) > 1:
            raise Rejected(409, "several_under_key", idempotency_key=key, ids=[f.id for f in found])
        return found[0]

    def counts(self) -> dict[str, int]:
        """How many of each thing happened: the numbers tests usually assert on."""
        counts: Counter[str] = Counter()
        counts["authorizations"] = len(self.authorizations)
        counts.update(auth.status for auth in self.authorizations.values())
        counts["captures"] = len(self.captures)
        counts["voids"] = len(self.voids)
        counts["refunds"] = len(self.refunds)
        counts["declines"] = len(self.declines)
        counts["reservations"] = len(self.reservations)
        counts.update(res.status for res in self.reservations.values())
        counts.update(self.calls)
        return dict(counts)

    def snapshot(self) -> dict[str, Any]:
        """The whole ledger as JSON, for `GET /_ledger`."""
        return {
            "authorizations": {k: asdict(v) for k, v in self.authorizations.items()},
            "captures": list(self.captures),
            "voids": list(self.voids),
            "refunds": list(self.refunds),
            "declines": list(self.declines),
            "reservations": {k: asdict(v) for k, v in self.reservations.items()},
            "stock": dict(self.stock),
            "idempotency_keys": self.idempotency.keys(),
            "notifications": list(self.notifications),
            "counts": self.counts(),
        }


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"
