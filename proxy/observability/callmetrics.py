"""The per-call series (requests, attempts, latency) kept as plain numbers, built at scrape.

Every upstream call updates three series: `sidecar_requests_total`,
`sidecar_attempts_total` and `sidecar_request_duration_seconds`. With
prometheus_client's `Counter.inc` and `Histogram.observe` each update takes a lock
and checks the metric's state: about 20k instructions per proxied request (callgrind,
some 5% of the sidecar's CPU for a small request). Here an update is a dict lookup
and an addition on the event loop's thread; a scrape reads the numbers and builds
the same families, names, labels, buckets and exemplars prometheus_client would.

A scrape may run on another thread (prometheus_client's own server): it copies each
dict in one C-level call under the GIL, so it sees every series whole, each number
as of some moment during the scrape, as prometheus_client's own values would be.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar, Sample
from prometheus_client.utils import floatToGoString

LATENCY = "sidecar_request_duration_seconds"
REQUESTS_DOC = "Calls to an upstream by how they ended for the caller."
ATTEMPTS_DOC = "Attempts made (each retry is one), by result."
LATENCY_DOC = "Time from the call's start to the upstream's response headers (or the refusal)."


class _Latency:
    """One upstream's histogram: a count per bucket (not cumulative), sum, exemplars."""

    __slots__ = ("counts", "exemplars", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.exemplars: list[Exemplar | None] = [None] * size
        self.sum = 0.0


class CallMetrics(Collector):
    """The counters and the latency histogram every upstream call updates."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self._bounds = [float(b) for b in buckets]
        self._les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        self._requests: dict[tuple[str, str], int] = {}
        self._attempts: dict[tuple[str, str], int] = {}
        self._latency: dict[str, _Latency] = {}
        self._created: dict[tuple[str, ...], float] = {}

    # -- updates (the hot path) ----------------------------------------------------

    def request(self, upstream: str, outcome: str) -> None:
        key = (upstream, outcome)
        count = self._requests.get(key)
        if count is None:
            self.prepare_request(upstream, outcome)
            count = 0
        self._requests[key] = count + 1

    def attempt(self, upstream: str, result: str) -> None:
        key = (upstream, result)
        count = self._attempts.get(key)
        if count is None:
            self._created[("attempts", upstream, result)] = time.time()
            count = 0
        self._attempts[key] = count + 1

    def observe(self, upstream: str, seconds: float, trace_id: str | None = None) -> None:
        latency = self._latency.get(upstream)
        if latency is None:
            latency = self.prepare_latency(upstream)
        index = bisect_left(self._bounds, seconds)  # the first bound >= seconds: `le`
        latency.counts[index] += 1
        latency.sum += seconds
        if trace_id is not None:
            latency.exemplars[index] = Exemplar({"trace_id": trace_id}, seconds, time.time())

    # -- series at zero, so rate() sees the first event ------------------------------

    def prepare_request(self, upstream: str, outcome: str) -> None:
        if (upstream, outcome) not in self._requests:
            self._created[("requests", upstream, outcome)] = time.time()
            self._requests[(upstream, outcome)] = 0

    def prepare_latency(self, upstream: str) -> _Latency:
        latency = self._latency.get(upstream)
        if latency is None:
            self._created[("latency", upstream)] = time.time()
            latency = self._latency[upstream] = _Latency(len(self._les))
        return latency

    # -- scrape ------------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        yield CounterMetricFamily("sidecar_requests", REQUESTS_DOC, labels=["upstream", "outcome"])
        yield CounterMetricFamily("sidecar_attempts", ATTEMPTS_DOC, labels=["upstream", "result"])
        yield HistogramMetricFamily(LATENCY, LATENCY_DOC, labels=["upstream"])

    def collect(self) -> Iterable[Metric]:
        created = dict(self._created)
        requests = CounterMetricFamily(
            "sidecar_requests", REQUESTS_DOC, labels=["upstream", "outcome"]
        )
        for (upstream, outcome), count in list(self._requests.items()):
            requests.add_metric(
                [upstream, outcome], count, created=created.get(("requests", upstream, outcome))
            )
        yield requests
        attempts = CounterMetricFamily(
            "sidecar_attempts", ATTEMPTS_DOC, labels=["upstream", "result"]
        )
        for (upstream, result), count in list(self._attempts.items()):
            attempts.add_metric(
                [upstream, result], count, created=created.get(("attempts", upstream, result))
            )
        yield attempts
        latency = HistogramMetricFamily(LATENCY, LATENCY_DOC, labels=["upstream"])
        for upstream, histogram in list(self._latency.items()):
            counts, exemplars = list(histogram.counts), list(histogram.exemplars)
            buckets: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            running = 0
            for le, count, exemplar in zip(self._les, counts, exemplars, strict=True):
                running += count
                buckets.append((le, running) if exemplar is None else (le, running, exemplar))
            latency.add_metric([upstream], buckets, histogram.sum)
            began = created.get(("latency", upstream))
            if began is not None:  # as prometheus_client's Histogram exports it
                latency.samples.append(Sample(LATENCY + "_created", {"upstream": upstream}, began))
        yield latency
