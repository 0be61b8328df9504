"""A real Prometheus scrapes the sidecar's admin listener; PromQL reads back a scripted run.

The shipped config (`config/sidecar.yaml`) runs in front of the simulator, with
the payment breaker tightened so that a handful of failures trip it. The
simulator and the sidecar run on an event loop of their own thread, so they keep
answering scrapes while the (synchronous) tests query Prometheus; Prometheus
itself is Debian's binary in a subprocess, scraping every second and loading
`deploy/prometheus/alerts.yaml`. Everything is set up once for the module.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import threading
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.app import Sidecar
from proxy.config import source as yamlsource
from proxy.simulator import Simulator, start_simulator
from tests.conftest import make_config
from tests.observability import prom

SIDECAR_YAML = prom.ROOT / "config" / "sidecar.yaml"
SIMULATOR_YAML = prom.ROOT / "config" / "simulator.yaml"
UPSTREAMS = ("payment", "inventory", "shipping", "coupon", "fraud")
JOB = "checkout-sidecar"

INVENTORY_OK = 10  # plain GETs through the sidecar
CHECKOUTS = 2  # each calls inventory twice: reserve, then commit
REFUSED_AFTER_OPEN = 3
ORDER: dict[str, Any] = {
    "items": [{"sku": "sku-1", "qty": 1}],
    "amount": 2_000,
    "currency": "EUR",
    "customer": "cust-1",
    "card": "4242",
    "address": {"country": "DE", "zip": "10115"},
}
GRAFANA_VARIABLES = {
    "$__rate_interval": "30s",
    "$job": ".*",
    "$instance": ".*",
    "$upstream": ".*",
}

T = TypeVar("T")


@dataclass
class Run:
    """What the scripted run sent and saw, to compare with what Prometheus stored."""

    payment_errors: int = 0
    payment_refused: int = 0
    checkout_statuses: list[int] = field(default_factory=list)


class LoopThread:
    """An event loop on its own thread: the sidecar keeps serving while tests block."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


class Stack:
    """The simulator and the shipped sidecar in front of it, data and admin listeners bound."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sim: Simulator | None = None
        self.sidecar: Sidecar | None = None
        self.runners: list[web.AppRunner] = []
        self.url = ""
        self.admin_port = 0

    async def start(self) -> None:
        simulator = yaml.safe_load(SIMULATOR_YAML.read_text())
        for name in UPSTREAMS:
            simulator["upstreams"][name]["port"] = 0
        self.sim = await start_simulator(simulator)
        self.sidecar = Sidecar(make_config(self._sidecar_config(self.sim)))
        data = web.AppRunner(self.sidecar.build_app(), access_log=None)
        admin = web.AppRunner(self.sidecar.build_admin_app(), access_log=None)
        for runner in (data, admin):
            await runner.setup()  # the data app's startup starts the sidecar
            self.runners.append(runner)
            await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{data.addresses[0][1]}"
        self.admin_port = admin.addresses[0][1]
        self.sidecar.ready = True

    def _sidecar_config(self, sim: Simulator) -> dict[str, Any]:
        # the sidecar's own loader: yaml.safe_load reads the retry key `on:` as True
        document = yamlsource.parse(SIDECAR_YAML.read_text(), str(SIDECAR_YAML), env={})
        assert document.data is not None and not document.errors, document.errors
        data = copy.deepcopy(document.data)
        for name in UPSTREAMS:
            data["upstreams"][name]["url"] = sim.url(name)
        data["upstreams"]["orders"]["url"] = f"{sim.url('fraud')}/_notify"
        # no retries and a small min_calls: each failing call counts once, a few trip it;
        # open for longer than the test, so it is still open when Prometheus is asked
        data["upstreams"]["payment"]["retry"] = {"attempts": 1}
        data["upstreams"]["payment"]["breaker"] = {
            "min_calls": 5,
            "failure_rate": 0.5,
            "open_for": "5m",
        }
        data["store"] = f"sqlite://{self.workdir}/sidecar-{uuid.uuid4().hex[:8]}.db"
        data["listen"] = "127.0.0.1:0"
        data["admin"] = {"listen": "127.0.0.1:0"}
        data["queue"]["poll_interval"] = "20ms"
        data["composite"]["checkout"]["recovery_interval"] = "1h"
        return data

    async def scripted_run(self) -> Run:
        assert self.sim is not None and self.sidecar is not None
        run = Run()
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for _ in range(CHECKOUTS):
                headers = {"Idempotency-Key": f"prom-{uuid.uuid4().hex[:12]}"}
                async with http.post(f"{self.url}/checkout", json=ORDER, headers=headers) as r:
                    await r.read()
                    run.checkout_statuses.append(r.status)
            await self._drained()  # the confirmations' follow-up jobs are done
            for _ in range(INVENTORY_OK):
                async with http.get(f"{self.url}/inventory/echo") as r:
                    await r.read()
                    assert r.status == 200, await r.text()
            self.sim.set_faults("payment", {"error_rate": 1.0, "error_status": 503})
            refused = 0
            for _ in range(30):  # bounded: the breaker must open well before this
                async with http.get(f"{self.url}/payment/echo") as r:
                    await r.read()
                    assert r.status == 503
                    if r.headers.get("X-Sidecar-Error") == "circuit_open":
                        refused += 1
                        if refused == REFUSED_AFTER_OPEN:
                            break
                    else:
                        run.payment_errors += 1
            run.payment_refused = refused
        return run

    async def _drained(self) -> None:
        assert self.sidecar is not None and self.sidecar.durable.queue is not None
        queue = self.sidecar.durable.queue
        async with asyncio.timeout(10):
            while await queue.depth() > 0:  # noqa: ASYNC110 (the queue lives in SQLite)
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()  # the data app's cleanup closes the sidecar
        if self.sim is not None:
            await self.sim.close()


@dataclass
class Scraped:
    prometheus: prom.Prometheus
    run: Run
    admin_target: str


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    prom.binaries()  # skip before starting anything when Prometheus is unavailable
    workdir = tmp_path_factory.mktemp("prometheus-scrape")
    thread = LoopThread()
    stack = Stack(workdir)
    try:
        thread.run(stack.start())
        target = f"127.0.0.1:{stack.admin_port}"
        with prom.running_prometheus(
            workdir / "prometheus", [target], job=JOB, rule_files=[prom.ALERTS]
        ) as prometheus:
            prometheus.wait_until(
                "the sidecar target to be up", lambda: _target_up(prometheus, target)
            )
            run = thread.run(stack.scripted_run())
            expected = INVENTORY_OK + 2 * CHECKOUTS
            prometheus.wait_until(
                "a scrape after the run",
                lambda: (
                    prometheus.value(
                        'sum(sidecar_requests_total{upstream="payment",outcome="circuit_open"})'
                    )
                    == run.payment_refused
                    and prometheus.value(
                        'sum(sidecar_requests_total{upstream="inventory",outcome="ok"})'
                    )
                    >= expected
                ),
            )
            yield Scraped(prometheus, run, target)
    finally:
        try:
            thread.run(stack.close())
        finally:
            thread.stop()


def _target_up(prometheus: prom.Prometheus, address: str) -> bool:
    return any(
        t["labels"].get("instance") == address and t["health"] == "up" for t in prometheus.targets()
    )


# -- the scrape -----------------------------------------------------------------------


def test_prometheus_scrapes_the_admin_metrics_endpoint(scraped: Scraped) -> None:
    (target,) = scraped.prometheus.targets()
    assert target["health"] == "up", target.get("lastError")
    assert target["scrapeUrl"] == f"http://{scraped.admin_target}/metrics"
    assert target["labels"]["job"] == JOB


def test_the_scripted_run_did_what_it_was_meant_to(scraped: Scraped) -> None:
    assert scraped.run.checkout_statuses == [200] * CHECKOUTS
    assert scraped.run.payment_errors >= 1
    assert scraped.run.payment_refused == REFUSED_AFTER_OPEN


# -- counters and rates ---------------------------------------------------------------


def test_inventory_ok_count_is_what_was_sent(scraped: Scraped) -> None:
    value = scraped.prometheus.value(
        'sum(sidecar_requests_total{upstream="inventory",outcome="ok"})'
    )
    assert value == INVENTORY_OK + 2 * CHECKOUTS


def test_payment_errors_and_refusals_are_counted_by_outcome(scraped: Scraped) -> None:
    p = scraped.prometheus
    errors = p.value('sum(sidecar_requests_total{upstream="payment",outcome="error"})')
    refused = p.value('sum(sidecar_requests_total{upstream="payment",outcome="circuit_open"})')
    assert (errors, refused) == (scraped.run.payment_errors, scraped.run.payment_refused)


def test_request_rate_is_positive_after_the_run(scraped: Scraped) -> None:
    rates = scraped.prometheus.query("sum by (upstream) (rate(sidecar_requests_total[30s]))")
    by_upstream = {r["metric"]["upstream"]: float(r["value"][1]) for r in rates}
    assert by_upstream["inventory"] > 0
    assert by_upstream["payment"] > 0


def test_confirmed_checkouts_are_counted_with_their_latency(scraped: Scraped) -> None:
    p = scraped.prometheus
    assert p.value('sum(sidecar_checkouts_total{result="confirmed"})') == CHECKOUTS
    assert p.value("sum(sidecar_checkout_duration_seconds_count)") == CHECKOUTS


# -- histograms and gauges ------------------------------------------------------------


def test_inventory_p99_latency_is_a_sane_number(scraped: Scraped) -> None:
    p99 = scraped.prometheus.value(
        "histogram_quantile(0.99, sum by (le) "
        '(rate(sidecar_request_duration_seconds_bucket{upstream="inventory"}[30s])))'
    )
    # the simulated inventory answers at once; its per-try timeout is 500 ms
    assert 0 < p99 <= 0.5


def test_open_payment_breaker_reads_1_and_the_others_read_closed(scraped: Scraped) -> None:
    p = scraped.prometheus
    assert p.value('sidecar_breaker_state{upstream="payment",state="open"}') == 1
    assert p.value('sidecar_breaker_state{upstream="payment",state="closed"}') == 0
    assert p.value('sidecar_breaker_state{upstream="inventory",state="closed"}') == 1
    opened = p.value('sum(sidecar_breaker_transitions_total{upstream="payment",to_state="open"})')
    assert opened == 1


def test_queue_gauges_read_an_empty_queue(scraped: Scraped) -> None:
    p = scraped.prometheus
    assert p.value("sidecar_queue_depth") == 0
    assert p.value("sidecar_queue_dead_letters") == 0


# -- the shipped dashboard and alerts against real data -------------------------------


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(prom.DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            queries.append((panel["title"], expr))
    return queries


def test_every_dashboard_query_evaluates(scraped: Scraped) -> None:
    failures = []
    for title, expr in _dashboard_queries():
        try:
            scraped.prometheus.query(expr)
        except prom.PrometheusError as exc:
            failures.append(f"{title}: {exc}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "title",
    [
        "Request rate by upstream",
        "Errors by upstream and outcome",
        "Latency p50 / p99 by upstream",
        "Breaker state",
        "Checkout latency p50 / p99",
        "Queue depth",
    ],
)
def test_dashboard_panel_shows_the_run(scraped: Scraped, title: str) -> None:
    exprs = [expr for panel, expr in _dashboard_queries() if panel == title]
    assert exprs, f"no panel titled {title!r}"
    for expr in exprs:
        result = scraped.prometheus.query(expr)
        values = [float(r["value"][1]) for r in result]
        # NaN is fine for a series without traffic in the window (0/0), not for all of them
        assert any(v == v for v in values), f"{title}: {expr} returned no number: {values}"


def test_checkouts_by_result_panel_sees_the_first_checkouts(scraped: Scraped) -> None:
    (expr,) = [expr for panel, expr in _dashboard_queries() if panel == "Checkouts by result"]
    rates = {r["metric"]["result"]: float(r["value"][1]) for r in scraped.prometheus.query(expr)}
    assert rates.get("confirmed", 0) > 0


def test_breaker_state_panel_reads_open_for_payment(scraped: Scraped) -> None:
    (expr,) = [expr for panel, expr in _dashboard_queries() if panel == "Breaker state"]
    states = {r["metric"]["upstream"]: float(r["value"][1]) for r in scraped.prometheus.query(expr)}
    assert states["payment"] == 2  # the panel maps 2 to "open"
    assert states["inventory"] == 0


def test_breaker_alert_is_pending_for_payment(scraped: Scraped) -> None:
    """`for: 1m` has not passed yet, so the alert is pending, for payment only."""

    def pending() -> list[dict[str, Any]]:
        alerts = scraped.prometheus.api("/api/v1/alerts")["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "SidecarCircuitBreakerOpen"]

    scraped.prometheus.wait_until("the breaker alert to be evaluated", lambda: pending())
    (alert,) = pending()
    assert alert["state"] == "pending"
    assert alert["labels"]["upstream"] == "payment"
    assert alert["labels"]["instance"] == scraped.admin_target


def test_alert_rules_load_and_evaluate_without_errors(scraped: Scraped) -> None:
    def rules() -> list[dict[str, Any]]:
        groups = scraped.prometheus.api("/api/v1/rules")["groups"]
        return [rule for group in groups for rule in group["rules"]]

    scraped.prometheus.wait_until(
        "every rule to be evaluated", lambda: all(r["health"] != "unknown" for r in rules())
    )
    alerts = re.findall(r"^\s+- alert: (\S+)", prom.ALERTS.read_text(), re.M)
    assert sorted(rule["name"] for rule in rules()) == sorted(alerts)
    assert [(r["name"], r.get("lastError")) for r in rules() if r["health"] != "ok"] == []
