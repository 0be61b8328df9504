"""The Grafana dashboard is well formed, covers what an SRE looks at, and names only
metrics the sidecar exports; the same holds for the alert rules and their tests.

The exported names come from a scrape of the admin `/metrics` of a sidecar built
from the shipped config, so a renamed or removed metric fails here, not on a
dashboard that silently shows "No data".
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import Sidecar
from proxy.config.loader import load_config
from tests.conftest import StartServer
from tests.observability import prom

SIDECAR_YAML = prom.ROOT / "config" / "sidecar.yaml"

# (what the dashboard must show, strings that one target's expr must all contain)
REQUIRED_PANELS = [
    ("request rate per upstream", ["rate(sidecar_requests_total", "by (upstream)"]),
    ("errors per upstream", ["sidecar_requests_total", 'outcome!~"ok|fallback"', "upstream"]),
    ("p50 per upstream", ["histogram_quantile(0.5,", "sidecar_request_duration_seconds_bucket"]),
    ("p99 per upstream", ["histogram_quantile(0.99,", "sidecar_request_duration_seconds_bucket"]),
    ("breaker state", ["sidecar_breaker_state", "by (upstream)"]),
    ("retries", ["sidecar_retries_total", "reason"]),
    ("fallbacks", ["sidecar_fallbacks_total", "reason"]),
    ("hedges", ["rate(sidecar_hedges_total", "upstream", "result"]),
    ("rate limited calls", ["rate(sidecar_rate_limited_total", "upstream", "scope"]),
    ("rate limit bucket fill", ["sidecar_rate_limit_tokens", "upstream"]),
    ("rate limit store errors", ["sidecar_rate_limit_store_errors_total", "action"]),
    ("checkouts by result", ["sidecar_checkouts_total", "by (result)"]),
    ("compensations", ["sidecar_compensations_total", "step"]),
    ("queue depth", ["sidecar_queue_depth"]),
    ("events published", ["rate(sidecar_events_published_total", "type", "result"]),
    ("events outbox", ["sidecar_events_outbox_pending"]),
]


def _dashboard() -> dict[str, Any]:
    return json.loads(prom.DASHBOARD.read_text())  # type: ignore[no-any-return]


def _panels() -> list[dict[str, Any]]:
    return [p for p in _dashboard()["panels"] if p["type"] != "row"]


def _exprs() -> list[str]:
    return [" ".join(t["expr"].split()) for p in _panels() for t in p["targets"]]


@pytest.fixture
async def exported(start_server: StartServer) -> set[str]:
    """Series names the admin listener of the shipped config exports."""
    config = load_config(SIDECAR_YAML, env={"SIDECAR_STORE": "memory://"})
    sidecar = Sidecar(config)
    try:
        server = await start_server(sidecar.build_admin_app())
        async with (
            aiohttp.ClientSession() as http,
            http.get(server.make_url("/metrics")) as response,
        ):
            assert response.status == 200
            text = await response.text()
    finally:
        await sidecar.close()
    return prom.exported_series_names(text)


# -- shape -----------------------------------------------------------------------------


def test_dashboard_has_grafana_top_level_fields() -> None:
    dashboard = _dashboard()
    assert dashboard["title"] and dashboard["uid"]
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"job", "instance", "upstream"} <= set(variables)


def test_every_panel_has_an_id_a_place_and_prometheus_targets() -> None:
    ids = [p["id"] for p in _dashboard()["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _dashboard()["panels"]:
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("x", "y", "w", "h")), panel["title"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    for panel in _panels():
        assert panel["title"] and panel["type"], panel
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = panel["targets"]
        assert targets, f"{panel['title']} has no targets"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(t["expr"].strip() for t in targets), panel["title"]


def test_panel_queries_filter_by_the_dashboard_variables() -> None:
    for panel in _panels():
        for target in panel["targets"]:
            assert 'job=~"$job"' in target["expr"], (panel["title"], target["expr"])
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])


def test_panels_do_not_overlap() -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in _dashboard()["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"{panel['title']} overlaps {taken[(x, y)]}"
                taken[(x, y)] = panel["title"]


@pytest.mark.parametrize(("what", "needles"), REQUIRED_PANELS, ids=[w for w, _ in REQUIRED_PANELS])
def test_dashboard_shows(what: str, needles: list[str]) -> None:
    assert any(all(n in expr for n in needles) for expr in _exprs()), (
        f"no panel query shows {what} (one expr containing all of {needles})"
    )


# -- names -----------------------------------------------------------------------------


def test_the_metric_name_pattern_finds_names_in_promql() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(sidecar_request_duration_seconds_bucket"
        '{upstream="a"}[5m]))) / sidecar_queue_depth'
    )
    assert prom.metric_names_in(expr) == {
        "sidecar_request_duration_seconds_bucket",
        "sidecar_queue_depth",
    }


def test_exported_names_include_counter_and_histogram_series(exported: set[str]) -> None:
    assert {
        "sidecar_requests_total",
        "sidecar_request_duration_seconds_bucket",
        "sidecar_request_duration_seconds_count",
        "sidecar_breaker_state",
        "sidecar_queue_depth",
    } <= exported
    assert "sidecar_requests" not in exported  # a counter's series end in _total


@pytest.mark.parametrize(
    "path", [prom.DASHBOARD, prom.ALERTS, prom.ALERTS_TEST], ids=lambda p: Path(p).name
)
def test_every_metric_named_is_exported(path: Path, exported: set[str]) -> None:
    named = prom.metric_names_in(path.read_text())
    assert named, f"{path.name} names no sidecar metric at all"
    unknown = sorted(named - exported)
    assert not unknown, f"{path.name} names metrics the sidecar does not export: {unknown}"


def test_every_exported_family_is_on_the_dashboard(exported: set[str]) -> None:
    """Not strictly needed, but a metric nobody can see is a metric nobody watches."""
    on_dashboard = prom.metric_names_in(prom.DASHBOARD.read_text())

    def family(name: str) -> str:
        return re.sub(r"_(bucket|sum|count)$", "", name)

    # *_created holds when a series began; no panel needs it
    families = {family(name) for name in exported if not name.endswith("_created")}
    shown = {family(name) for name in on_dashboard}
    missing = sorted(families - shown)
    assert not missing, f"exported but on no panel: {missing}"
