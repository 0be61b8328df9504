"""A real Prometheus (and promtool) for tests: found or installed, started, queried, stopped.

The observability tests check what an SRE will actually run: rules through
`promtool`, dashboard and alert queries against what the sidecar exports, and a
real Prometheus scraping the admin listener. The binaries come from Debian's
`prometheus` package; when it is missing and cannot be installed, the tests
skip with a message that says so, instead of passing without checking anything.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "checkout-sidecar.json"

INSTALL_TIMEOUT_S = 600
METRIC_NAME = re.compile(r"\bsidecar_[a-z_]+")
"""A sidecar metric named in PromQL. Crude but strict: every `sidecar_...` word counts."""

SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "gauge": ("",),
    "untyped": ("",),
}


@dataclass(frozen=True)
class Binaries:
    prometheus: str
    promtool: str


@functools.cache
def _find_or_install() -> Binaries | str:
    """The binaries, installing Debian's package once if needed; a reason string if impossible."""
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        if shutil.which("apt-get") is None:
            return "apt-get is not available to install Debian's 'prometheus' package"
        if os.geteuid() != 0:
            return "Debian's 'prometheus' package is not installed and installing needs root"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            for command in (
                ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "prometheus"],
            ):
                done = subprocess.run(
                    command, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
                )
                if done.returncode != 0:
                    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
                    return f"{' '.join(command)} failed: {' | '.join(tail)}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"installing Debian's 'prometheus' package failed: {exc}"
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prometheus and promtool):
        return "Debian's 'prometheus' package installed no prometheus/promtool on PATH"
    return Binaries(prometheus, promtool)


def binaries() -> Binaries:
    """prometheus and promtool, or skip the test with the reason they are unavailable."""
    found = _find_or_install()
    if isinstance(found, str):
        pytest.skip(f"needs Debian's 'prometheus' package (prometheus, promtool): {found}")
    return found


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binaries().promtool, *map(str, args)], capture_output=True, text=True, timeout=60
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- metric names ---------------------------------------------------------------


def metric_names_in(promql: str) -> set[str]:
    return set(METRIC_NAME.findall(promql))


def exported_series_names(exposition: str) -> set[str]:
    """The series names a scrape of `exposition` gives Prometheus, by family type.

    Families without samples yet (a labelled counter before its first event) still
    count: their HELP/TYPE lines say what they will export.
    """
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


# -- a running Prometheus --------------------------------------------------------


class PrometheusError(AssertionError):
    pass


@dataclass
class Prometheus:
    """A Prometheus process on a loopback port, and its HTTP API."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400/422 carry the PromQL error as JSON
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector (or a scalar as a one-sample vector)."""
        data = self.api("/api/v1/query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, expr: str) -> float:
        """The single value of `expr`; fails when the result has no or several samples."""
        result = self.query(expr)
        if len(result) != 1:
            raise PrometheusError(f"{expr!r} gave {len(result)} samples, wanted 1: {result}")
        return float(result[0]["value"][1])

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("/api/v1/targets")["activeTargets"])

    def wait_until(self, what: str, check: Any, *, seconds: float = 15.0) -> None:
        """Poll `check()` (every 0.2 s, errors count as not yet) until true or `seconds` pass."""
        deadline = time.monotonic() + seconds
        last: object = None
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except (PrometheusError, OSError, KeyError, ValueError) as exc:
                last = exc
            time.sleep(0.2)
        raise PrometheusError(f"timed out after {seconds}s waiting for {what}; last: {last}")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def running_prometheus(
    workdir: Path,
    targets: Iterable[str],
    *,
    job: str = "checkout-sidecar",
    rule_files: Iterable[Path] = (),
) -> Iterator[Prometheus]:
    """Run Prometheus scraping `targets` (host:port) every second, evaluating `rule_files`
    every second; it is always stopped on exit."""
    found = binaries()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML, and needs no quoting rules
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(path) for path in rule_files],
                "scrape_configs": [
                    {
                        "job_name": job,
                        "scrape_interval": "1s",
                        "scrape_timeout": "900ms",
                        "static_configs": [{"targets": list(targets)}],
                    }
                ],
            },
            indent=2,
        )
    )
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                found.prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        server.wait_until("Prometheus to be ready", lambda: _ready(server), seconds=15)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _ready(server: Prometheus) -> bool:
    if server.process.poll() is not None:
        raise AssertionError(f"prometheus exited ({server.process.returncode}):\n{server.tail()}")
    with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
        return response.status == 200
