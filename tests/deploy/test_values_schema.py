"""values.schema.json and the chart's own checks refuse bad values, in `helm lint`
and `helm template` alike, with a message that names the value."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import CHART, KUBE_VERSION, RELEASE, helm_args, run_helm

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())

# (values, what the error must say, whether the JSON schema itself refuses them; the
# others are checks across values, made while rendering)
BAD_VALUES = [
    pytest.param({"app": {"replicaCount": -1}}, "app.replicaCount", True, id="negative-replicas"),
    pytest.param(
        {"image": {"pullPolicy": "Sometimes"}}, "image.pullPolicy", True, id="pull-policy"
    ),
    pytest.param({"sidecar": {"adminPort": "nine"}}, "sidecar.adminPort", True, id="port-not-int"),
    pytest.param({"sidecar": {"port": 8080.5}}, "sidecar.port", True, id="port-fraction"),
    pytest.param({"service": {"port": 70000}}, "service.port", True, id="port-out-of-range"),
    pytest.param({"replicas": 3}, "replicas", True, id="unknown-key"),
    pytest.param(
        {"sidecar": {"probes": {"liveness": {"periodSecond": 5}}}},
        "periodSecond",
        True,
        id="typo-in-probe",
    ),
    pytest.param(
        {"sidecar": {"securityContext": {"readOnlyRootFilesystem": False}}},
        "readOnlyRootFilesystem",
        True,
        id="writable-root-fs",
    ),
    pytest.param(
        {"sidecar": {"securityContext": {"runAsNonRoot": False}}}, "runAsNonRoot", True, id="root"
    ),
    pytest.param({"store": {"url": "postgres://db/checkout"}}, "store.url", True, id="store-url"),
    pytest.param({"store": {"url": "mysql://db/checkout"}}, "store.url", True, id="store-scheme"),
    pytest.param(
        {"store": {"url": "sqlite:///var/lib/checkout-sidecar/a b.db"}},
        "store.url",
        True,
        id="store-url-space",
    ),
    pytest.param(
        {"store": {"allowPodLocalWithReplicas": "yes"}},
        "store.allowPodLocalWithReplicas",
        True,
        id="allow-pod-local-not-bool",
    ),
    pytest.param(
        {"store": {"existingSecret": 42}}, "store.existingSecret", True, id="secret-not-str"
    ),
    pytest.param(
        {"store": {"existingSecret": "Checkout_Store"}},
        "store.existingSecret",
        True,
        id="secret-bad-name",
    ),
    pytest.param({"store": {"secretKey": ""}}, "store.secretKey", True, id="secret-key-empty"),
    pytest.param(
        {"store": {"persistence": {"enabled": "true"}}},
        "store.persistence.enabled",
        True,
        id="persistence-not-bool",
    ),
    pytest.param(
        {"store": {"persistence": {"size": "lots"}}},
        "store.persistence.size",
        True,
        id="persistence-size",
    ),
    pytest.param(
        {"store": {"persistence": {"accessModes": ["ReadWriteMany"]}}},
        "accessModes",
        True,
        id="persistence-unknown-key",
    ),
    pytest.param(
        {"store": {"redis": {"existingSecret": "checkout-redis"}}},
        "redis",
        True,
        id="store-redis-renamed",
    ),
    pytest.param(
        {"app": {"replicaCount": 2}},
        "app.replicaCount is 2 but store.url",
        False,
        id="replicas-on-sqlite",
    ),
    pytest.param(
        {"app": {"replicaCount": 3}, "store": {"url": "memory://"}},
        "app.replicaCount is 3 but store.url (memory://) is pod-local",
        False,
        id="replicas-on-memory",
    ),
    pytest.param(
        {"store": {"url": "redis://:hunter2@redis:6379/0"}},
        "store.url holds a password",
        False,
        id="password-in-url",
    ),
    pytest.param(
        {"store": {"url": "sqlite:///data/checkout.db"}},
        "must name a file on the state volume",
        False,
        id="sqlite-off-the-volume",
    ),
    pytest.param(
        {"sidecar": {"upstreams": {"payment": "payment:8080"}}},
        "payment",
        True,
        id="upstream-not-a-url",
    ),
    pytest.param({"sidecar": {"logLevel": "verbose"}}, "logLevel", True, id="log-level"),
    pytest.param({"shutdown": {"grace": -5}}, "shutdown.grace", True, id="negative-grace"),
    pytest.param(
        {"terminationGracePeriodSeconds": 25},
        "must exceed shutdown.drainDelay",
        False,
        id="period-equals-drain-plus-grace",
    ),
    pytest.param(
        {"terminationGracePeriodSeconds": 20},
        "must exceed shutdown.drainDelay",
        False,
        id="period-below-grace",
    ),
    pytest.param(
        {"shutdown": {"grace": 40}},
        "must exceed shutdown.drainDelay",
        False,
        id="grace-raised-alone",
    ),
    pytest.param(
        {"config": "listen: 127.0.0.1:8080\nshutdown:\n  grace: 5s\n"},
        "top-level shutdown",
        False,
        id="shutdown-in-config",
    ),
    pytest.param({"sidecar": {"port": 9901}}, "must differ", False, id="same-ports"),
    pytest.param(
        {"tls": {"mounts": [{"name": "ca", "secret": "a", "configMap": "b"}]}},
        "tls.mounts",
        True,
        id="tls-mount-secret-and-config-map",
    ),
    pytest.param(
        {"tls": {"mounts": [{"name": "ca"}]}}, "tls.mounts", True, id="tls-mount-of-nothing"
    ),
    pytest.param(
        {"tls": {"mounts": [{"name": "Payment_Client", "secret": "a"}]}},
        "tls.mounts",
        True,
        id="tls-mount-name",
    ),
    pytest.param(
        {"tls": {"mounts": [{"name": "ca", "secret": "a", "mountPath": "/etc/checkout-sidecar"}]}},
        "tls.mounts",
        True,
        id="tls-mount-over-the-config",
    ),
    pytest.param(
        {"tls": {"mounts": [{"name": "ca", "secret": "a", "items": []}]}},
        "tls.mounts",
        True,
        id="tls-mount-unknown-key",
    ),
    pytest.param(
        {"serviceMonitor": {"enabled": True}, "service": {"enabled": False}},
        "needs service.enabled",
        False,
        id="monitor-without-service",
    ),
]


def merged(override: dict[str, Any]) -> dict[str, Any]:
    """values.yaml with `override` merged in, as Helm merges a values file."""

    def merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = value

    values = copy.deepcopy(DEFAULTS)
    merge(values, override)
    return values


def schema_errors(values: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMA)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(values)]


def test_schema_is_draft_07_and_the_default_values_satisfy_it() -> None:
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert schema_errors(DEFAULTS) == []


@pytest.mark.parametrize(("override", "message", "by_schema"), BAD_VALUES)
def test_json_schema_refuses_bad_values(
    override: dict[str, Any], message: str, by_schema: bool
) -> None:
    errors = schema_errors(merged(override))
    if by_schema:
        assert errors, f"the schema accepts {override}"
    else:
        assert errors == [], "a cross-value check should pass the schema and fail rendering"


@pytest.mark.parametrize(("override", "message", "by_schema"), BAD_VALUES)
@pytest.mark.parametrize("command", ["lint", "template"])
def test_helm_refuses_bad_values(
    helm: str,
    tmp_path: Path,
    command: str,
    override: dict[str, Any],
    message: str,
    by_schema: bool,
) -> None:
    values = tmp_path / "bad-values.yaml"
    values.write_text(yaml.safe_dump(override))
    args = [command, *helm_args([values])]
    if command == "template":
        args[1:1] = [RELEASE]
        args += ["--kube-version", KUBE_VERSION]
    result = run_helm(helm, *args)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"helm {command} accepted {override}:\n{output}"
    assert message in output, output
    if by_schema:
        assert "values don't meet the specifications of the schema" in output


def test_values_files_of_the_tests_satisfy_the_schema() -> None:
    values_dir = Path(__file__).resolve().parent / "values"
    for path in sorted(values_dir.glob("*.yaml")):
        assert schema_errors(merged(yaml.safe_load(path.read_text()))) == [], path.name


def test_every_store_value_has_a_type_and_a_description() -> None:
    def walk(path: str, node: dict[str, Any]) -> list[str]:
        missing = [] if "description" in node else [path]
        if not {"type", "anyOf", "oneOf", "const"} & node.keys():
            missing.append(f"{path} (no type)")
        for name, child in node.get("properties", {}).items():
            missing += walk(f"{path}.{name}", child)
        return missing

    tls = SCHEMA["properties"]["tls"]
    assert walk("tls", tls) == []
    store = SCHEMA["properties"]["store"]
    assert walk("store", store) == []
    assert set(store["properties"]) == set(DEFAULTS["store"])
    assert "description" in SCHEMA["properties"]["app"]["properties"]["replicaCount"]
