"""The scripted story of `checkout-sidecar demo`: checkouts under injected faults, one row each.

Every scenario sends real `POST /checkout` requests to the sidecar, injects or
clears faults in the simulator, and reads the simulator's ledger to say what
really happened upstream (captured, voided, released, refunded). The story ends
with the metrics that moved, a ledger summary and the invariants the design
promises: nothing left authorized or reserved, nothing charged twice.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.demo import Stage
from proxy.simulator import Simulator

# The scenario names, in the order the story tells them (tests look for each).
SCENARIOS = (
    "normal checkout",
    "normal + coupon",
    "shipping down",
    "coupon down",
    "coupon back",
    "payment declined",
    "payment down",
    "breaker open",
    "half-open recovery",
    "repeated request",
    "same key, new body",
)

ORDER: dict[str, Any] = {
    "items": [{"sku": "sku-1", "qty": 1}],
    "amount": 2599,
    "currency": "EUR",
    "customer": "cust-42",
    "card": "tok_visa",
    "address": {"country": "FR", "zip": "75001"},
}
DRAIN_TIMEOUT_S = 15.0
REFUND_TIMEOUT_S = 10.0
MAX_FAILING_CHECKOUTS = 15  # "payment down" rows before giving up on the breaker opening
MAX_RECOVERY_CHECKOUTS = 6

# Counters worth showing at the end, with the labels that say something.
METRICS = (
    "sidecar_checkouts",
    "sidecar_checkout_decisions",
    "sidecar_requests",
    "sidecar_retries",
    "sidecar_retry_budget_refusals",
    "sidecar_breaker_transitions",
    "sidecar_fallbacks",
    "sidecar_jobs",
    "sidecar_idempotency",
)

COLUMNS = (("scenario", 20, "<"), ("HTTP", 4, ">"), ("status", 9, "<"),
           ("degraded", 9, "<"), ("latency", 9, ">"), ("notes", 0, "<"))  # fmt: skip


@dataclass
class Answer:
    """One checkout as the client saw it."""

    http: int
    body: dict[str, Any]
    headers: dict[str, str]
    latency_ms: float

    @property
    def status(self) -> str:
        return str(self.body.get("status") or ("error" if "error" in self.body else "-"))

    @property
    def degraded(self) -> str:
        return ",".join(self.body.get("degraded") or []) or "-"

    def step(self, name: str) -> dict[str, Any]:
        return (self.body.get("steps") or {}).get(name) or {}

    def step_body(self, name: str) -> dict[str, Any]:
        body = self.step(name).get("body")
        return body if isinstance(body, dict) else {}


@dataclass
class Story:
    stage: Stage
    session: aiohttp.ClientSession
    out: TextIO
    confirmed: list[Answer] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def simulator(self) -> Simulator:
        return self.stage.simulator

    # -- talking to the sidecar and the simulator -------------------------------------

    async def checkout(self, key: str, **changes: Any) -> Answer:
        body = {**ORDER, **changes}
        began = time.perf_counter()
        async with self.session.post(
            self.stage.url + "/checkout", json=body, headers={"Idempotency-Key": key}
        ) as response:
            data = await response.json(content_type=None)
            latency_ms = (time.perf_counter() - began) * 1000
            answer = Answer(response.status, data or {}, dict(response.headers), latency_ms)
        if answer.body.get("decision") == "confirmed":  # pending ones must be captured later
            self.confirmed.append(answer)
        return answer

    def fault(self, upstream: str, **faults: Any) -> None:
        """Add `faults` to what the simulator config gives `upstream` (its latency stays)."""
        base = self.simulator.config.upstream(upstream).faults()
        self.simulator.set_faults(
            upstream, {**base.model_dump(mode="json", exclude_defaults=True), **faults}
        )

    def heal(self, upstream: str) -> None:
        self.fault(upstream)

    async def breaker_state(self, upstream: str) -> str:
        async with self.session.get(self.stage.admin_url + "/admin/breakers") as response:
            return str((await response.json())[upstream]["state"])

    def money(self, cents: int) -> str:
        return f"{cents / 100:.2f}"

    def payment_of(self, answer: Answer) -> Any:
        auth_id = answer.step_body("payment").get("id")
        return self.simulator.ledger.authorizations.get(auth_id) if auth_id else None

    def reservation_of(self, answer: Answer) -> str:
        res_id = answer.step_body("inventory").get("id")
        reservation = self.simulator.ledger.reservations.get(res_id) if res_id else None
        return reservation.status if reservation is not None else "none"

    # -- printing ---------------------------------------------------------------------

    def header(self) -> None:
        self.line(*(name for name, _, _ in COLUMNS))
        self.line(*("-" * max(width, len(name)) for name, width, _ in COLUMNS[:-1]), "-" * 40)

    def line(self, *cells: str) -> None:
        parts = [
            f"{cell:{align}{width}}"
            for cell, (_, width, align) in zip(cells, COLUMNS, strict=False)
        ]
        print("  ".join(parts).rstrip(), file=self.out, flush=True)

    def section(self, text: str) -> None:
        print(f"\n# {text}", file=self.out, flush=True)

    def row(self, scenario: str, answer: Answer, notes: str) -> None:
        self.line(
            scenario,
            str(answer.http),
            answer.status,
            answer.degraded,
            f"{answer.latency_ms:.1f} ms",
            notes,
        )

    def expect(self, condition: bool, problem: str) -> None:
        if not condition:
            self.problems.append(problem)
            print(f"  !! {problem}", file=self.out, flush=True)

    # -- the scenarios ----------------------------------------------------------------

    async def normal(self) -> None:
        self.section("all five upstreams healthy")
        answer = await self.checkout("demo-normal")
        auth = self.payment_of(answer)
        self.row(
            "normal checkout",
            answer,
            f"captured {self.money(auth.captured_amount) if auth else '?'}, "
            f"reservation {self.reservation_of(answer)}, fraud screened after the answer",
        )
        self.expect(answer.http == 200, "a healthy checkout was not confirmed")
        answer = await self.checkout("demo-coupon", coupon="SAVE10")
        auth = self.payment_of(answer)
        discount = answer.step_body("coupon").get("discount", 0)
        self.row(
            "normal + coupon",
            answer,
            f"SAVE10 -{self.money(discount)}, captured "
            f"{self.money(auth.captured_amount) if auth else '?'}",
        )
        self.expect(answer.http == 200, "a healthy checkout with a coupon was not confirmed")

    async def shipping_down(self) -> None:
        self.section("shipping answers 503 to everything (non-critical: standard shipping)")
        self.fault("shipping", error_rate=1.0)
        answer = await self.checkout("demo-shipping-down")
        self.heal("shipping")
        quote = answer.step_body("shipping")
        self.row(
            "shipping down",
            answer,
            f"{quote.get('service', '?')} shipping {self.money(quote.get('price', 0))} "
            f"(fallback after {answer.step('shipping').get('attempts')} attempts), "
            f"captured {self.money(getattr(self.payment_of(answer), 'captured_amount', 0))}",
        )
        self.expect(
            answer.http == 200 and answer.degraded == "shipping",
            "shipping down did not give a confirmed checkout degraded by shipping",
        )

    async def coupon_down(self) -> None:
        self.section("coupon service down: no discount now, the coupon is re-applied later")
        self.fault("coupon", error_rate=1.0)
        answer = await self.checkout("demo-coupon-down", coupon="SAVE10")
        auth = self.payment_of(answer)
        self.row(
            "coupon down",
            answer,
            f"no discount now: captured {self.money(auth.captured_amount) if auth else '?'}, "
            "coupon re-application queued",
        )
        self.expect(
            answer.http == 200 and answer.degraded == "coupon",
            "coupon down did not give a confirmed checkout degraded by coupon",
        )
        self.heal("coupon")
        began = time.perf_counter()
        refunds: list[dict[str, Any]] = []
        while auth is not None and time.perf_counter() - began < REFUND_TIMEOUT_S:
            refunds = [r for r in self.simulator.ledger.refunds if r["authorization"] == auth.id]
            if refunds:
                break
            await asyncio.sleep(0.05)
        waited = (time.perf_counter() - began) * 1000
        async with self.session.get(
            f"{self.stage.url}/checkout/{answer.body.get('checkout_id')}"
        ) as response:
            polled = Answer(response.status, await response.json(), {}, waited)
        polled.body["degraded"] = answer.body.get("degraded")
        refunded = sum(r["amount"] for r in refunds)
        self.row(
            "coupon back",
            polled,
            f"queue re-applied SAVE10: refund {self.money(refunded)} "
            f"{waited / 1000:.1f} s after the coupon service came back"
            if refunds
            else "no refund yet",
        )
        self.expect(bool(refunds), "the deferred coupon was never refunded")

    async def payment_declined(self) -> None:
        self.section("the card is declined (payment answers 402)")
        answer = await self.checkout("demo-declined", card="declined")
        reservation = self.reservation_of(answer)
        self.row(
            "payment declined",
            answer,
            f"payment {answer.step('payment').get('http_status')} card_declined; "
            f"reservation {reservation}",
        )
        self.expect(
            answer.http == 409 and reservation == "released",
            "a declined card did not give 409 with the reservation released",
        )

    async def payment_down(self) -> None:
        self.section(
            "payment provider down (503): retries, then the breaker opens and refuses at once"
        )
        self.fault("payment", error_rate=1.0)
        opened = False
        for i in range(1, MAX_FAILING_CHECKOUTS + 1):
            answer = await self.checkout(f"demo-payment-down-{i}")
            payment = answer.step("payment")
            if payment.get("reason") == "circuit_open":
                opened = True
                self.open_row(answer)
                break
            self.row(
                "payment down",
                answer,
                f"payment {payment.get('reason')} x{payment.get('attempts')} attempts; "
                f"reservation {self.reservation_of(answer)}; "
                f"breaker {await self.breaker_state('payment')}"
                + ("; void queued" if answer.http == 202 else ""),
            )
        self.expect(opened, "the payment breaker never opened")
        for i in range(2):
            self.open_row(await self.checkout(f"demo-payment-open-{i}"))
        breaker = self.stage.sidecar.runtime.upstreams.get("payment")
        policy = breaker.policies.breaker if breaker is not None else None
        open_for = policy.options.open_for if policy is not None else 2.0
        self.heal("payment")
        print(
            f"  ... payment fixed; waiting out open_for ({open_for:g} s) for the half-open probes",
            file=self.out,
            flush=True,
        )
        await asyncio.sleep(open_for + 0.1)
        closed = False
        for i in range(1, MAX_RECOVERY_CHECKOUTS + 1):
            before = await self.breaker_state("payment")
            answer = await self.checkout(f"demo-payment-back-{i}")
            after = await self.breaker_state("payment")
            self.row(
                "half-open recovery",
                answer,
                f"breaker {before} -> {after}; " + self.recovery_note(answer),
            )
            if after == "closed" and answer.http == 200:
                closed = True
                break
        self.expect(closed, "the payment breaker did not close after the provider came back")

    def recovery_note(self, answer: Answer) -> str:
        auth = self.payment_of(answer)
        if answer.http == 200 and auth is not None:
            return f"captured {self.money(auth.captured_amount)}"
        if answer.http == 202:
            return "authorized; capture queued (the probe slots were busy)"
        reason = answer.step("payment").get("reason")
        if reason == "circuit_open":
            return "payment circuit_open: the probe slots were taken (queued voids)"
        return f"payment {reason}"

    def open_row(self, answer: Answer) -> None:
        payment = answer.step("payment")
        self.row(
            "breaker open",
            answer,
            f"payment refused in {payment.get('latency_ms')} ms, no call made; "
            f"reservation {self.reservation_of(answer)} (answer waits for the other steps)",
        )

    async def repeated(self) -> None:
        self.section("the app repeats a checkout (same Idempotency-Key, same body)")
        first = await self.checkout("demo-repeat")
        self.row("repeated request", first, "first request")
        again = await self.checkout("demo-repeat")
        ledger = self.simulator.ledger
        auths = [
            a for a in ledger.authorizations.values() if a.idempotency_key == "demo-repeat:payment"
        ]
        ids = {a.id for a in auths}
        captures = [c for c in ledger.captures if c["authorization"] in ids]
        replayed = again.headers.get("Idempotent-Replayed", "absent")
        self.row(
            "repeated request",
            again,
            f"Idempotent-Replayed: {replayed}; ledger: {len(auths)} authorization, "
            f"{len(captures)} capture",
        )
        self.expect(
            replayed == "true" and len(auths) == 1 and len(captures) == 1,
            "a repeated checkout was not replayed once-only",
        )
        other = await self.checkout("demo-repeat", amount=9999)
        self.row(
            "same key, new body",
            other,
            f"{other.body.get('reason')}: the key belongs to another order, nothing ran",
        )
        self.expect(other.http == 422, "the same key with another body was not refused with 422")

    # -- the end ------------------------------------------------------------------------

    async def drain(self) -> tuple[int, int]:
        """Wait for the job queue to finish (voids, refunds, fraud screening, emails)."""
        queue = self.stage.sidecar.durable.queue
        if queue is None:
            return 0, 0
        began = time.perf_counter()
        depth = await queue.depth()
        while depth and time.perf_counter() - began < DRAIN_TIMEOUT_S:
            await asyncio.sleep(0.1)
            depth = await queue.depth()
        dead = len(await queue.dead(limit=1000))
        print(
            f"\n# job queue drained in {time.perf_counter() - began:.1f} s: "
            f"{depth} left, {dead} dead-lettered",
            file=self.out,
            flush=True,
        )
        return depth, dead

    async def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with self.session.get(self.stage.admin_url + "/metrics") as response:
            text = await response.text()
        samples = {}
        for family in text_string_to_metric_families(text):
            if family.name not in METRICS:
                continue
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def print_metrics(self, before: dict[Any, float], after: dict[Any, float]) -> None:
        print("\n# metrics that changed (GET /metrics on the admin listener)", file=self.out)
        rows = []
        for (name, labels), value in sorted(after.items()):
            delta = value - before.get((name, labels), 0.0)
            if delta:
                rows.append((name, ",".join(f"{k}={v}" for k, v in labels), delta))
        width = max((len(name) for name, _, _ in rows), default=0)
        label_width = max((len(labels) for _, labels, _ in rows), default=0)
        for name, labels, delta in rows:
            print(f"  {name:<{width}}  {labels:<{label_width}}  {delta:>+5.0f}", file=self.out)

    def ledger_summary(self, depth: int, dead: int) -> bool:
        ledger = self.simulator.ledger
        auths = list(ledger.authorizations.values())
        by_status = Counter(a.status for a in auths)
        reservations = Counter(r.status for r in ledger.reservations.values())
        print("\n# ledger (what the simulated upstreams really did)", file=self.out)
        print(
            f"  authorizations {len(auths)} (captured {by_status['captured']}, voided "
            f"{by_status['voided']}, refunded {by_status['refunded']}, still authorized "
            f"{by_status['authorized']}); declines {len(ledger.declines)}",
            file=self.out,
        )
        print(
            f"  captures {len(ledger.captures)}, voids {len(ledger.voids)}, refunds "
            f"{len(ledger.refunds)} ({self.money(sum(r['amount'] for r in ledger.refunds))})",
            file=self.out,
        )
        print(
            f"  reservations {len(ledger.reservations)} (committed {reservations['committed']}, "
            f"released {reservations['released']}, still reserved {reservations['reserved']})",
            file=self.out,
        )
        captures = Counter(c["authorization"] for c in ledger.captures)
        keys = Counter(a.idempotency_key for a in auths if a.idempotency_key)
        confirmed_ids = {a.step_body("payment").get("id") for a in self.confirmed}
        checks = {
            "no authorization left hanging": by_status["authorized"] == 0,
            "no reservation left hanging": reservations["reserved"] == 0,
            "nothing captured twice": all(n == 1 for n in captures.values()),
            "one authorization per checkout key": all(n == 1 for n in keys.values()),
            "every confirmed order captured": all(
                i in ledger.authorizations and ledger.authorizations[i].captured_amount > 0
                for i in confirmed_ids
            ),
            "refunds within captures": all(a.refunded_amount <= a.captured_amount for a in auths),
            "job queue empty, nothing dead-lettered": depth == 0 and dead == 0,
        }
        failed = [name for name, ok in checks.items() if not ok] + self.problems
        verdict = "OK" if not failed else "VIOLATED: " + "; ".join(failed)
        print(
            f"\ninvariants: {', '.join(k for k in checks)} ... {verdict}",
            file=self.out,
            flush=True,
        )
        return not failed


async def tell_story(stage: Stage, out: TextIO) -> int:
    """Run every scenario against `stage`; 0 when every invariant held."""
    began = time.perf_counter()
    print(
        f"checkout-sidecar demo: sidecar {stage.url} (admin {stage.admin_url}), simulated "
        + ", ".join(f"{n} :{p}" for n, p in stage.simulator.ports.items()),
        file=out,
    )
    print("demo overrides: " + "; ".join(stage.overrides), file=out)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        story = Story(stage, session, out)
        before = await story.scrape()
        print(file=out)
        story.header()
        await story.normal()
        await story.shipping_down()
        await story.coupon_down()
        await story.payment_declined()
        await story.payment_down()
        await story.repeated()
        depth, dead = await story.drain()
        story.print_metrics(before, await story.scrape())
        ok = story.ledger_summary(depth, dead)
    if stage.events is not None:
        await print_events(stage, out)
    print(f"demo finished in {time.perf_counter() - began:.1f} s", file=out, flush=True)
    return 0 if ok else 1


async def print_events(stage: Stage, out: TextIO, wait: float = 5.0) -> None:
    """The events the demo's own consumer received (DEMO_BROKER), once they stop arriving."""
    assert stage.events is not None
    received = stage.events.received
    deadline = time.monotonic() + wait
    seen, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        if len(received) != seen:
            seen, quiet_since = len(received), time.monotonic()
        elif received and time.monotonic() - quiet_since > 1.0:
            break
        await asyncio.sleep(0.1)
    print(
        f"\n# events received (a consumer bound to {stage.events.exchange} "
        f"on {stage.events.broker})",
        file=out,
    )
    if not received:
        print("  (none)", file=out, flush=True)
        return
    width = max(len(t) for t, _, _ in received)
    swidth = max(len(s) for _, s, _ in received)
    print(f"  {'type':<{width}}  {'subject':<{swidth}}  id", file=out)
    for type_, subject, id_ in received:
        print(f"  {type_:<{width}}  {subject:<{swidth}}  {id_}", file=out)
    print(f"  {len(received)} events", file=out, flush=True)
