"""The shipped alert rules pass `promtool check rules` and their own unit tests.

`deploy/prometheus/alerts_test.yaml` makes every alert fire once and stay quiet
at least once; this test runs it, and checks that no alert was left untested.
"""

from __future__ import annotations

import re

import yaml

from tests.observability import prom


def _alert_names() -> list[str]:
    groups = yaml.safe_load(prom.ALERTS.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules_accepts_the_alerts() -> None:
    done = prom.promtool("check", "rules", prom.ALERTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alert_names())} rules found" in done.stdout


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    done = prom.promtool("test", "rules", prom.ALERTS_TEST)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    tests = yaml.safe_load(prom.ALERTS_TEST.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = set(_alert_names())
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested staying quiet"


def test_every_alert_has_a_severity_and_a_summary() -> None:
    groups = yaml.safe_load(prom.ALERTS.read_text())["groups"]
    for rule in (rule for group in groups for rule in group["rules"]):
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        assert re.fullmatch(r"Sidecar[A-Z][A-Za-z]+", rule["alert"]), rule["alert"]
