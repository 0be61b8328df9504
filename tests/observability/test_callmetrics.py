"""The per-call series kept as plain numbers scrape like prometheus_client's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

from proxy.observability.callmetrics import LATENCY, CallMetrics

BUCKETS = (0.001, 0.01, 0.1, 1.0)
SAMPLES = (0.0005, 0.001, 0.002, 0.01, 0.5, 1.0, 7.0)


def _ours() -> CollectorRegistry:
    registry = CollectorRegistry()
    calls = CallMetrics(BUCKETS)
    registry.register(calls)
    for seconds in SAMPLES:
        calls.observe("pay", seconds)
    return registry


def _theirs() -> CollectorRegistry:
    registry = CollectorRegistry()
    histogram = Histogram(LATENCY, "doc", ["upstream"], buckets=BUCKETS, registry=registry)
    for seconds in SAMPLES:
        histogram.labels("pay").observe(seconds)
    return registry


def test_buckets_count_and_sum_match_prometheus_clients_histogram() -> None:
    def samples(registry: CollectorRegistry) -> dict[str, float]:
        return {
            f"{s.name}{sorted(s.labels.items())}": s.value
            for family in registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert samples(_ours()) == samples(_theirs())


def test_counters_start_at_zero_when_prepared_and_count_each_call() -> None:
    registry = CollectorRegistry()
    calls = CallMetrics(BUCKETS)
    registry.register(calls)
    calls.prepare_request("pay", "ok")
    labels = {"upstream": "pay", "outcome": "ok"}
    assert registry.get_sample_value("sidecar_requests_total", labels) == 0
    assert registry.get_sample_value("sidecar_requests_created", labels) is not None
    calls.request("pay", "ok")
    calls.request("pay", "ok")
    calls.attempt("pay", "status_200")
    assert registry.get_sample_value("sidecar_requests_total", labels) == 2
    attempt = {"upstream": "pay", "result": "status_200"}
    assert registry.get_sample_value("sidecar_attempts_total", attempt) == 1


def test_an_exemplar_goes_to_its_bucket_in_openmetrics_only() -> None:
    registry = CollectorRegistry()
    calls = CallMetrics(BUCKETS)
    registry.register(calls)
    calls.observe("pay", 0.05, trace_id="4bf92f3577b34da6a3ce929d0e0e4736")
    text = openmetrics(registry).decode()
    line = next(x for x in text.splitlines() if 'le="0.1"' in x)
    assert 'trace_id="4bf92f3577b34da6a3ce929d0e0e4736"' in line
    assert "trace_id" not in generate_latest(registry).decode()
