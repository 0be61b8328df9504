"""The Helm chart: it lints, renders valid Kubernetes manifests with the default values
and with each values file, and what it renders runs the sidecar the way the design
asks (loopback data plane, token-guarded admin, probes, hot-reloadable config,
shutdown within the pod's grace period, Redis from a Secret, monitoring)."""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.config.loader import validate_text
from proxy.observability.metrics import BREAKER_STATES, OUTCOMES, Metrics, StateCollector
from proxy.storage.url import SCHEMES as STORE_SCHEMES
from tests.deploy.conftest import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    ROOT,
    VALUES_DIR,
    VALUES_FILES,
    RenderChart,
    Rendered,
    helm_args,
    run_helm,
)

VALUE_SETS = [pytest.param([], id="default")] + [
    pytest.param([path], id=path.stem) for path in VALUES_FILES
]
CUSTOM_RESOURCES = [VALUES_DIR / "custom-resources.yaml"]
MONITORING = [VALUES_DIR / "monitoring.yaml"]
NATIVE = [VALUES_DIR / "native-sidecar.yaml"]
TLS_MOUNTS = [VALUES_DIR / "tls-mounts.yaml"]
REDIS = [VALUES_DIR / "redis-store.yaml"]
SQLITE_CLAIM = [VALUES_DIR / "sqlite-single-pod.yaml"]
POSTGRESQL = [VALUES_DIR / "postgresql-secret.yaml"]
SENTINEL = [VALUES_DIR / "redis-sentinel-secret.yaml"]
STATE_DIR = "/var/lib/checkout-sidecar"
CRDS = {"ServiceMonitor", "PrometheusRule"}
FAKE_TOKEN = "t" * 48


# What a store Secret of the values files holds, by a word of its name; a scheme the
# sidecar of this checkout cannot read yet stands in as a Redis URL.
STORE_URLS = {
    "postgresql": "postgresql://checkout:secret@postgresql.db.svc:5432/checkout",
    "sentinel": "redis+sentinel://:secret@sentinel-0.redis.svc:26379,"
    "sentinel-1.redis.svc:26379/mymaster/0",
    "redis": "redis://:secret@redis.shop.svc:6379/0",
}


def store_url_in_secret(secret_name: str) -> str:
    for word, url in STORE_URLS.items():
        if word in secret_name and url.partition("://")[0] in STORE_SCHEMES:
            return url
    return STORE_URLS["redis"]


def env_values(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment, with a stand-in for each value from a Secret."""
    env = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = (
                store_url_in_secret(ref["name"]) if entry["name"] == "SIDECAR_STORE" else FAKE_TOKEN
            )
    return env


def env_entry(container: dict[str, Any], name: str) -> dict[str, Any]:
    for entry in container.get("env", []):
        if entry["name"] == name:
            return entry
    raise AssertionError(f"{container['name']} has no env {name}")


def config_text(rendered: Rendered) -> str:
    return rendered.one("ConfigMap")["data"]["sidecar.yaml"]


def admin_port(container: dict[str, Any]) -> int:
    return int(env_values(container)["SIDECAR_ADMIN_LISTEN"].rpartition(":")[2])


def port_number(container: dict[str, Any], name: str) -> int:
    for port in container["ports"]:
        if port["name"] == name:
            return port["containerPort"]
    raise AssertionError(f"{container['name']} has no port named {name}")


# --- lint and schema-valid manifests ----------------------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS)
def test_helm_lint_passes_strict(helm: str, values: list[Path]) -> None:
    result = run_helm(helm, "lint", "--strict", *helm_args(values))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", VALUE_SETS)
def test_rendered_manifests_are_valid_kubernetes_objects(
    render: RenderChart, values: list[Path]
) -> None:
    rendered = render(values)
    assert rendered.documents
    for doc in rendered.documents:
        if doc["kind"] in CRDS:
            check_custom_resource_shape(doc)
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {exc.path}")


def check_custom_resource_shape(doc: dict[str, Any]) -> None:
    """kubernetes-validate has no schema for prometheus-operator's CRDs: check their
    shape against the parts of the CRDs the chart uses."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"]
    if doc["kind"] == "ServiceMonitor":
        assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
        assert spec["selector"]["matchLabels"]
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {
                "port", "path", "scheme", "interval", "scrapeTimeout", "authorization",
                "bearerTokenSecret", "relabelings", "metricRelabelings", "honorLabels",
            }  # fmt: skip
            assert re.fullmatch(r"[0-9]+(ms|s|m|h)", endpoint["interval"])
            auth = endpoint["authorization"]
            assert auth["type"] == "Bearer" and set(auth["credentials"]) == {"name", "key"}
    else:
        assert set(spec) == {"groups"}
        for group in spec["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
                assert re.fullmatch(r"[A-Z][A-Za-z]+", rule["alert"])
                assert isinstance(rule["expr"], str) and rule["expr"].strip()
                assert "for" not in rule or re.fullmatch(r"[0-9]+(ms|s|m|h)", rule["for"])
                assert rule["labels"]["severity"] in {"warning", "critical"}


def test_default_values_render_config_secret_app_state_claim_and_admin_service(
    render: RenderChart,
) -> None:
    assert render().kinds() == [
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "Secret",
        "Service",
    ]


def test_monitoring_values_add_a_servicemonitor_and_a_prometheusrule(
    render: RenderChart,
) -> None:
    kinds = render(MONITORING).kinds()
    assert "ServiceMonitor" in kinds and "PrometheusRule" in kinds


# --- the sidecar container ---------------------------------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS)
def test_sidecar_runs_non_root_on_a_read_only_root_filesystem(
    render: RenderChart, values: list[Path]
) -> None:
    rendered = render(values)
    context = rendered.sidecar()["securityContext"]
    assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    assert rendered.pod_spec()["securityContext"]["runAsNonRoot"] is True
    # every path it writes is a volume: the store's directory (a claim or an emptyDir)
    # and /tmp
    volumes = {v["name"]: v for v in rendered.pod_spec()["volumes"]}
    mounts = {m["mountPath"]: m for m in rendered.sidecar()["volumeMounts"]}
    assert {"emptyDir", "persistentVolumeClaim"} & volumes[mounts[STATE_DIR]["name"]].keys()
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    for path in (STATE_DIR, "/tmp"):
        assert not mounts[path].get("readOnly")


@pytest.mark.parametrize("values", VALUE_SETS)
def test_probes_ask_healthz_and_readyz_on_the_admin_port(
    render: RenderChart, values: list[Path]
) -> None:
    sidecar = render(values).sidecar()
    paths = {
        kind: sidecar[kind]["httpGet"]["path"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for kind in paths:
        assert port_number(sidecar, sidecar[kind]["httpGet"]["port"]) == admin_port(sidecar)


def test_resources_come_from_the_values(render: RenderChart) -> None:
    assert render().sidecar()["resources"] == {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"memory": "256Mi"},
    }
    custom = render(CUSTOM_RESOURCES).sidecar()
    assert custom["resources"] == {
        "requests": {"cpu": "250m", "memory": "256Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }
    assert custom["readinessProbe"]["successThreshold"] == 2
    assert custom["image"] == "registry.example.com/platform/checkout-sidecar:0.1.0-rc.2"
    assert custom["imagePullPolicy"] == "Always"


def test_app_calls_its_upstreams_through_the_sidecar_on_loopback(render: RenderChart) -> None:
    for values in ([], NATIVE):
        rendered = render(values)
        sidecar_env = env_values(rendered.sidecar())
        listen = sidecar_env["SIDECAR_LISTEN"]
        assert listen.startswith("127.0.0.1:"), "the data plane must stay inside the pod"
        app = next(c for c in rendered.pod_spec()["containers"] if c["name"] == "app")
        app_env = env_values(app)
        upstreams = {k.removesuffix("_UPSTREAM") for k in sidecar_env if k.endswith("_UPSTREAM")}
        assert upstreams
        for name in upstreams:
            path = name.lower().replace("_", "-")
            assert app_env[f"{name}_URL"] == f"http://{listen}/{path}"
        assert app_env["CHECKOUT_URL"] == f"http://{listen}/checkout"


# --- config, hot reload, shutdown ------------------------------------------------------


def test_chart_ships_the_repository_default_config() -> None:
    shipped = (CHART / "files" / "sidecar.yaml").read_text()
    assert shipped == (ROOT / "config" / "sidecar.yaml").read_text(), (
        "helm/checkout-sidecar/files/sidecar.yaml differs from config/sidecar.yaml: "
        "cp config/sidecar.yaml helm/checkout-sidecar/files/sidecar.yaml"
    )


@pytest.mark.parametrize("values", VALUE_SETS)
def test_configmap_is_a_valid_sidecar_config_in_the_containers_environment(
    render: RenderChart, values: list[Path]
) -> None:
    rendered = render(values)
    env = env_values(rendered.sidecar())
    config, errors = validate_text(config_text(rendered), "configmap/sidecar.yaml", env=env)
    assert config is not None, "\n".join(str(e) for e in errors)
    # admin beyond loopback (probes, scrapes), so with the token from the Secret
    assert not config.admin.listen.is_loopback
    assert config.admin.token == FAKE_TOKEN
    assert config.listen.is_loopback
    assert config.store == env["SIDECAR_STORE"]
    for name, upstream in config.upstreams.items():
        variable = f"{name.upper().replace('-', '_')}_UPSTREAM"
        if variable in env:
            assert upstream.url.rstrip("/") == env[variable].rstrip("/")


@pytest.mark.parametrize("values", VALUE_SETS)
def test_grace_period_outlasts_the_sidecars_drain_and_grace(
    render: RenderChart, values: list[Path]
) -> None:
    rendered = render(values)
    config, errors = validate_text(config_text(rendered), env=env_values(rendered.sidecar()))
    assert config is not None, errors
    period = rendered.pod_spec()["terminationGracePeriodSeconds"]
    # the sidecar exits at the latest 1 s after drain_delay + grace
    assert period >= config.shutdown.drain_delay + config.shutdown.grace + 1


def test_shutdown_values_are_written_into_the_config(render: RenderChart) -> None:
    for values, drain, grace, period in (([], 5, 20, 30), (CUSTOM_RESOURCES, 10, 45, 60)):
        rendered = render(values)
        config, _ = validate_text(config_text(rendered), env=env_values(rendered.sidecar()))
        assert config is not None
        assert (config.shutdown.drain_delay, config.shutdown.grace) == (drain, grace)
        assert rendered.pod_spec()["terminationGracePeriodSeconds"] == period


def test_config_is_mounted_as_a_directory_so_updates_reach_the_sidecar(
    render: RenderChart,
) -> None:
    rendered = render()
    sidecar = rendered.sidecar()
    config_path = Path(sidecar["args"][sidecar["args"].index("--config") + 1])
    mount = next(m for m in sidecar["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    # a subPath mount never sees a ConfigMap update
    assert "subPath" not in mount and mount["readOnly"] is True
    volume = next(v for v in rendered.pod_spec()["volumes"] if v["name"] == mount["name"])
    configmap = rendered.one("ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name in configmap["data"]
    # hot reload, not a rollout: no checksum annotation restarts pods on a config change
    annotations = rendered.deployment()["spec"]["template"]["metadata"].get("annotations", {})
    assert not any("checksum" in key for key in annotations)


def test_custom_config_replaces_the_default(render: RenderChart) -> None:
    rendered = render(NATIVE)
    config, errors = validate_text(config_text(rendered), env=env_values(rendered.sidecar()))
    assert config is not None, errors
    assert set(config.upstreams) == {"payment", "inventory", "gift-cards"}
    assert config.upstreams["gift-cards"].url.startswith("http://gift-cards.shop.svc")


# --- secrets: admin token, Redis ------------------------------------------------------


def test_admin_token_is_a_generated_secret_by_default(render: RenderChart) -> None:
    rendered = render()
    secret = rendered.one("Secret")
    entry = env_entry(rendered.sidecar(), "SIDECAR_ADMIN_TOKEN")
    assert entry["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "token",
    }
    assert len(secret["data"]["token"]) >= 48  # base64 of 48 random characters


def test_redis_store_url_and_admin_token_come_from_existing_secrets(
    render: RenderChart,
) -> None:
    rendered = render(REDIS)
    sidecar = rendered.sidecar()
    assert not rendered.has("PersistentVolumeClaim"), "a shared store needs no state claim"
    assert env_entry(sidecar, "SIDECAR_STORE")["valueFrom"]["secretKeyRef"] == {
        "name": "checkout-redis",
        "key": "redis-url",
    }
    assert env_entry(sidecar, "SIDECAR_ADMIN_TOKEN")["valueFrom"]["secretKeyRef"] == {
        "name": "checkout-sidecar-admin-token",
        "key": "admin-token",
    }
    assert not rendered.has("Secret"), "an existing Secret must not be shadowed by the chart"
    assert rendered.deployment()["spec"]["replicas"] == 4
    # the URL (and its password) never appears in the manifests
    assert not any("redis://" in str(e.get("value", "")) for e in sidecar["env"])


# --- the store: safe by default ----------------------------------------------------------

POD_LOCAL_FIX = (
    "is pod-local",
    "a client retry that lands on another pod is not recognised",
    "a rescheduled pod's unfinished checkouts are lost with its volume",
    "Use a shared store: PostgreSQL, or Redis with AOF and Sentinel",
    "app.replicaCount: 1 with SQLite on a persistent volume",
    "store.allowPodLocalWithReplicas: true",
)


def state_volume(rendered: Rendered) -> dict[str, Any]:
    mount = next(m for m in rendered.sidecar()["volumeMounts"] if m["mountPath"] == STATE_DIR)
    return next(v for v in rendered.pod_spec()["volumes"] if v["name"] == mount["name"])


def test_default_is_one_pod_with_sqlite_on_a_persistent_volume_claim(
    render: RenderChart,
) -> None:
    rendered = render()
    deployment = rendered.deployment()
    assert deployment["spec"]["replicas"] == 1
    # a ReadWriteOnce claim attaches to one node, and one process writes the SQLite file
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    store = env_values(rendered.sidecar())["SIDECAR_STORE"]
    assert store.startswith(f"sqlite://{STATE_DIR}/")
    claim = rendered.one("PersistentVolumeClaim")
    assert state_volume(rendered) == {
        "name": "checkout-sidecar-state",
        "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]},
    }
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert "storageClassName" not in claim["spec"]  # the cluster's default class
    # the journal of unfinished checkouts outlives `helm uninstall`
    assert claim["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}


def test_claim_size_class_and_retention_come_from_the_values(render: RenderChart) -> None:
    claim = render(CUSTOM_RESOURCES).one("PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert "annotations" not in claim["metadata"]
    no_class = render(sets=["store.persistence.storageClass=-"]).one("PersistentVolumeClaim")
    assert no_class["spec"]["storageClassName"] == ""


def test_single_pod_sqlite_on_an_existing_claim(render: RenderChart) -> None:
    rendered = render(SQLITE_CLAIM)
    assert not rendered.has("PersistentVolumeClaim"), "the claim is the user's"
    assert state_volume(rendered)["persistentVolumeClaim"] == {
        "claimName": "checkout-sidecar-journal"
    }
    assert rendered.deployment()["spec"]["strategy"] == {"type": "Recreate"}
    store = env_values(rendered.sidecar())["SIDECAR_STORE"]
    assert store == f"sqlite://{STATE_DIR}/checkout.db?timeout=5"


def test_sqlite_without_persistence_is_an_emptydir(render: RenderChart) -> None:
    rendered = render(sets=["store.persistence.enabled=false"])
    assert not rendered.has("PersistentVolumeClaim")
    assert state_volume(rendered)["emptyDir"] == {"sizeLimit": "256Mi"}
    assert rendered.deployment()["spec"]["strategy"] == {"type": "RollingUpdate"}


POD_LOCAL_WITH_REPLICAS = [
    pytest.param(["app.replicaCount=2"], id="sqlite-on-a-claim"),
    pytest.param(["app.replicaCount=2", "store.persistence.enabled=false"], id="sqlite-emptydir"),
    pytest.param(["app.replicaCount=3", "store.url=memory://"], id="memory"),
    pytest.param(["app.replicaCount=2", "store.url=unix:///run/redis.sock"], id="unix-socket"),
    pytest.param(["app.replicaCount=2", "app.enabled=false"], id="own-pod-spec"),
]


@pytest.mark.parametrize("sets", POD_LOCAL_WITH_REPLICAS)
@pytest.mark.parametrize("command", ["template", "lint"])
def test_several_replicas_on_a_pod_local_store_are_refused(
    helm: str, command: str, sets: list[str]
) -> None:
    args = [command, *helm_args(sets=sets)]
    if command == "template":
        args[1:1] = [RELEASE]
        args += ["--kube-version", KUBE_VERSION]
    result = run_helm(helm, *args)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"helm {command} accepted {sets}:\n{output}"
    replicas = sets[0].partition("=")[2]
    assert f"app.replicaCount is {replicas} but store.url" in output, output
    for part in POD_LOCAL_FIX:
        assert part in output, f"{part!r} missing from:\n{output}"


def test_several_replicas_on_a_pod_local_store_on_purpose(render: RenderChart) -> None:
    rendered = render(sets=["app.replicaCount=3", "store.allowPodLocalWithReplicas=true"])
    assert rendered.deployment()["spec"]["replicas"] == 3
    # each pod its own journal: an emptyDir each, never one claim shared by all
    assert not rendered.has("PersistentVolumeClaim")
    assert "emptyDir" in state_volume(rendered)
    assert rendered.deployment()["spec"]["strategy"] == {"type": "RollingUpdate"}
    memory = render(
        sets=["app.replicaCount=2", "store.url=memory://", "store.allowPodLocalWithReplicas=true"]
    )
    assert env_values(memory.sidecar())["SIDECAR_STORE"] == "memory://"


@pytest.mark.parametrize(
    ("values", "secret", "key", "replicas"),
    [
        pytest.param(POSTGRESQL, "checkout-postgresql", "store-url", 3, id="postgresql"),
        pytest.param(SENTINEL, "checkout-redis-sentinel", "url", 2, id="redis-sentinel"),
    ],
)
def test_several_replicas_share_a_store_whose_url_comes_from_a_secret(
    render: RenderChart, values: list[Path], secret: str, key: str, replicas: int
) -> None:
    rendered = render(values)
    deployment = rendered.deployment()
    assert deployment["spec"]["replicas"] == replicas
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
    assert env_entry(rendered.sidecar(), "SIDECAR_STORE") == {
        "name": "SIDECAR_STORE",
        "valueFrom": {"secretKeyRef": {"name": secret, "key": key}},
    }
    assert not rendered.has("PersistentVolumeClaim")
    assert "emptyDir" in state_volume(rendered)
    # the URL and its password stay in the Secret (the config's comments name the schemes)
    shown = "\n".join(
        line for line in rendered.text.splitlines() if not line.lstrip().startswith("#")
    )
    assert "postgresql://" not in shown and "sentinel://" not in shown


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgresql.db.svc:5432/checkout?sslmode=require",
        "redis+sentinel://sentinel-0.redis.svc:26379,sentinel-1.redis.svc:26379/mymaster/0",
        "rediss://redis.shop.svc:6380/0",
    ],
)
def test_several_replicas_share_a_store_named_by_a_url_without_password(
    render: RenderChart, url: str
) -> None:
    escaped = url.replace(",", "\\,")  # --set splits at a bare comma
    rendered = render(sets=["app.replicaCount=3", f"store.url={escaped}"])
    assert rendered.deployment()["spec"]["replicas"] == 3
    assert env_entry(rendered.sidecar(), "SIDECAR_STORE") == {"name": "SIDECAR_STORE", "value": url}
    assert not rendered.has("PersistentVolumeClaim")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        pytest.param(
            ["store.url=postgresql://checkout:hunter2@db:5432/checkout"],
            "store.url holds a password",
            id="password-in-url",
        ),
        pytest.param(
            ["store.url=redis://redis:6379/0?password=hunter2"],
            "store.url holds a password",
            id="password-parameter",
        ),
        pytest.param(
            ["store.url=sqlite:///tmp/checkout.db"],
            "must name a file on the state volume",
            id="sqlite-off-the-volume",
        ),
        pytest.param(
            ["store.url=sqlite://var/checkout.db"],
            "must name a file on the state volume",
            id="sqlite-relative",
        ),
        pytest.param(
            [
                "app.replicaCount=2",
                "store.allowPodLocalWithReplicas=true",
                "store.persistence.existingClaim=journal",
            ],
            "cannot hold the SQLite files of 2 pods",
            id="one-claim-for-several-pods",
        ),
    ],
)
def test_store_values_that_would_leak_or_lose_the_journal_are_refused(
    helm: str, sets: list[str], message: str
) -> None:
    result = run_helm(
        helm, "template", RELEASE, *helm_args(sets=sets), "--kube-version", KUBE_VERSION
    )
    assert result.returncode != 0, result.stdout
    assert message in result.stderr
    assert "hunter2" not in result.stderr


# --- admin Service and monitoring -------------------------------------------------------


@pytest.mark.parametrize("values", VALUE_SETS)
def test_admin_service_selects_the_pods_and_targets_the_admin_port(
    render: RenderChart, values: list[Path]
) -> None:
    rendered = render(values)
    service = rendered.one("Service")
    pod_labels = rendered.deployment()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port_number(rendered.sidecar(), port["targetPort"]) == admin_port(rendered.sidecar())


def test_servicemonitor_scrapes_metrics_with_the_admin_token(render: RenderChart) -> None:
    rendered = render(MONITORING)
    monitor = rendered.one("ServiceMonitor")
    service = rendered.one("Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    token_ref = env_entry(rendered.sidecar(), "SIDECAR_ADMIN_TOKEN")["valueFrom"]["secretKeyRef"]
    assert endpoint["authorization"]["credentials"] == token_ref


def exported_metric_names() -> set[str]:
    """The series names the sidecar's /metrics can show."""
    metrics = Metrics()
    metrics.watch(StateCollector(lambda: []))
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    names = set()
    for family in metrics.registry.collect():
        for suffix in suffixes.get(family.type, [""]):
            names.add(family.name + suffix)
    return names


def test_alerts_use_series_and_labels_the_sidecar_exports(render: RenderChart) -> None:
    rules = render(MONITORING).one("PrometheusRule")["spec"]["groups"][0]["rules"]
    exported = exported_metric_names()
    for rule in rules:
        used = set(re.findall(r"\bsidecar_[a-z_]+", rule["expr"]))
        assert used, rule["alert"]
        assert used <= exported, f"{rule['alert']} uses {used - exported}"
        for outcomes in re.findall(r'outcome=~"([^"]+)"', rule["expr"]):
            assert set(outcomes.split("|")) <= set(OUTCOMES), rule["alert"]
        for state in re.findall(r'state="([^"]+)"', rule["expr"]):
            assert state in BREAKER_STATES, rule["alert"]
    assert {r["alert"] for r in rules} >= {
        "CheckoutSidecarBreakerOpen",
        "CheckoutSidecarDeadLetters",
    }
    breaker = next(r for r in rules if r["alert"] == "CheckoutSidecarBreakerOpen")
    assert breaker["for"] == "5m"
    expiring = next(r for r in rules if r["alert"] == "CheckoutSidecarTlsCertificateExpiring")
    assert expiring["expr"].endswith("< 604800"), "7 days, as deploy/prometheus/alerts.yaml"


# --- certificates for TLS to upstreams ------------------------------------------------------


def test_tls_mounts_are_whole_read_only_secrets_and_config_maps(render: RenderChart) -> None:
    rendered = render(TLS_MOUNTS)
    volumes = {v["name"]: v for v in rendered.pod_spec()["volumes"]}
    mounts = {m["name"]: m for m in rendered.sidecar()["volumeMounts"]}

    client = volumes["checkout-sidecar-tls-payment-client"]["secret"]
    assert client == {"secretName": "payment-client-tls", "defaultMode": 0o440}
    ca = volumes["checkout-sidecar-tls-internal-ca"]["configMap"]
    assert ca == {"name": "internal-ca-bundle", "defaultMode": 0o440}
    assert mounts["checkout-sidecar-tls-payment-client"] == {
        "name": "checkout-sidecar-tls-payment-client",
        "mountPath": "/var/run/secrets/checkout-sidecar/payment-client",
        "readOnly": True,
    }
    assert mounts["checkout-sidecar-tls-internal-ca"]["mountPath"] == "/etc/checkout-sidecar-ca"
    # whole volumes, never subPath: a renewed Secret reaches the files without a restart
    assert all("subPath" not in m for m in rendered.sidecar()["volumeMounts"])


def test_no_tls_mounts_by_default(render: RenderChart) -> None:
    rendered = render([])
    assert not any(
        v["name"].startswith("checkout-sidecar-tls-") for v in rendered.pod_spec()["volumes"]
    )


# --- injection into the user's pod ----------------------------------------------------------


def test_native_sidecar_is_an_init_container_that_restarts_always(render: RenderChart) -> None:
    spec = render(NATIVE).pod_spec()
    assert [c["name"] for c in spec["initContainers"]] == ["checkout-sidecar"]
    assert spec["initContainers"][0]["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["app"]


PARENT_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: shop-checkout
spec:
  replicas: {{ include "checkout-sidecar.replicas" . }}
  strategy:
    {{- include "checkout-sidecar.strategy" . | nindent 4 }}
  selector:
    matchLabels: {app: shop-checkout}
  template:
    metadata:
      labels:
        app: shop-checkout
        {{- include "checkout-sidecar.podLabels" . | nindent 8 }}
    spec:
      terminationGracePeriodSeconds:
        {{ include "checkout-sidecar.terminationGracePeriodSeconds" . }}
      containers:
        - name: shop-checkout
          image: registry.example.com/shop-checkout:2.3.1
          env:
            - {name: PAYMENT_URL, value: "http://127.0.0.1:8080/payment"}
        {{- include "checkout-sidecar.container" . | nindent 8 }}
      volumes:
        {{- include "checkout-sidecar.volumes" . | nindent 8 }}
"""


@pytest.fixture
def parent_chart(tmp_path: Path) -> Path:
    """A user's chart with checkout-sidecar as a dependency and its own Deployment."""
    parent = tmp_path / "shop-checkout"
    (parent / "templates").mkdir(parents=True)
    shutil.copytree(CHART, parent / "charts" / "checkout-sidecar")
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: shop-checkout\nversion: 2.3.1\n"
        "dependencies:\n  - name: checkout-sidecar\n    version: 0.1.0\n"
    )
    (parent / "values.yaml").write_text(
        yaml.safe_dump(
            {
                "checkout-sidecar": {
                    "app": {"enabled": False},
                    "terminationGracePeriodSeconds": 45,
                    "sidecar": {"upstreams": {"payment": "http://payment.payments.svc"}},
                }
            }
        )
    )
    (parent / "templates" / "deployment.yaml").write_text(PARENT_DEPLOYMENT)
    return parent


def test_named_templates_add_the_sidecar_to_a_users_own_pod_spec(
    render: RenderChart, parent_chart: Path
) -> None:
    rendered = render(chart=parent_chart)
    assert rendered.kinds() == [
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "Secret",
        "Service",
    ]
    deployment = rendered.deployment()
    assert deployment["metadata"]["name"] == "shop-checkout"
    spec = rendered.pod_spec()
    assert [c["name"] for c in spec["containers"]] == ["shop-checkout", "checkout-sidecar"]
    assert spec["terminationGracePeriodSeconds"] == 45
    sidecar = rendered.sidecar()
    assert env_values(sidecar)["PAYMENT_UPSTREAM"] == "http://payment.payments.svc"
    # the names the parent's include produces are the objects the subchart renders
    config_volume = next(v for v in spec["volumes"] if "configMap" in v)
    assert config_volume["configMap"]["name"] == rendered.one("ConfigMap")["metadata"]["name"]
    state_volume = next(v for v in spec["volumes"] if "persistentVolumeClaim" in v)
    claim = rendered.one("PersistentVolumeClaim")["metadata"]["name"]
    assert state_volume["persistentVolumeClaim"]["claimName"] == claim
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    token_ref = env_entry(sidecar, "SIDECAR_ADMIN_TOKEN")["valueFrom"]["secretKeyRef"]
    assert token_ref["name"] == rendered.one("Secret")["metadata"]["name"]
    selector = rendered.one("Service")["spec"]["selector"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    for doc in rendered.documents:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_parent_chart_cannot_undercut_the_sidecars_grace(helm: str, parent_chart: Path) -> None:
    result = run_helm(
        helm, "template", RELEASE, str(parent_chart),
        "--set", "checkout-sidecar.terminationGracePeriodSeconds=20",
    )  # fmt: skip
    assert result.returncode != 0
    assert "must exceed shutdown.drainDelay + shutdown.grace" in result.stderr


def test_parent_chart_cannot_run_several_replicas_on_a_pod_local_store(
    helm: str, parent_chart: Path
) -> None:
    """The check runs with the example app off too: every render evaluates it."""
    result = run_helm(
        helm, "template", RELEASE, str(parent_chart),
        "--set", "checkout-sidecar.app.replicaCount=2",
    )  # fmt: skip
    assert result.returncode != 0
    assert "app.replicaCount is 2 but store.url" in result.stderr


# --- versions ------------------------------------------------------------------------------


def test_chart_app_version_and_image_tag_follow_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == values["image"]["tag"] == version
