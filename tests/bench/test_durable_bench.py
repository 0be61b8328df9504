"""The durable-features benchmark's pieces: config, wrk script, counters, arithmetic,
results file and report. No load is generated and no server is started here."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bench.durable import (
    JOB_TYPE,
    QUICK,
    Counts,
    QueueRun,
    amqp_available,
    combine_rounds,
    delivery_ok,
    drain_jobs,
    enqueue_jobs,
    markdown,
    metric_value,
    new_schema,
    overhead_rows,
    postgres_store_url,
    publish_events,
    redis_store_url,
    round_order,
    run_events,
    save_section,
    sidecar_yaml,
    store_label,
    write_keyed_script,
)
from proxy.config.loader import validate_text
from proxy.jobs import Job

METRICS = """\
# HELP sidecar_idempotency_total Requests with an idempotency key.
# TYPE sidecar_idempotency_total counter
sidecar_idempotency_total{result="first"} 1234.0
sidecar_idempotency_total{result="replayed"} 0.0
sidecar_requests_total{upstream="bench",outcome="ok"} 1240.0
sidecar_requests_total{outcome="ok",upstream="other"} 7.0
sidecar_requests_total{upstream="bench",outcome="error"} 2.0
"""


@pytest.mark.parametrize(
    "store",
    [
        None,
        "memory://",
        "sqlite:////tmp/x/s.db",
        "redis://127.0.0.1:6379/0?prefix=bench-1:",
        "postgresql://postgres@127.0.0.1:5432/postgres?schema=bench_idem_0123",
    ],
)
def test_sidecar_yaml_is_a_valid_config_idempotent_only_with_a_store(store: str | None) -> None:
    config, errors = validate_text(sidecar_yaml(18080, 19901, "http://127.0.0.1:18000", store))

    assert errors == []
    assert config is not None
    assert config.upstreams["bench"].idempotency is (store is not None)
    assert config.idempotency.store == store
    assert config.queue.workers is False


def test_keyed_script_posts_json_with_a_key_made_of_nonce_thread_and_counter(
    tmp_path: Path,
) -> None:
    text = write_keyed_script(tmp_path, "n0nce").read_text()

    assert 'local nonce = "n0nce"' in text
    assert 'nonce .. "-" .. thread_id .. "-" .. counter' in text
    assert '["Idempotency-Key"] = key' in text
    assert 'wrk.method = "POST"' in text
    assert "application/json" in text
    assert "WRK_JSON" in text  # bench.wrk's report, so the output parses as usual


def test_metric_value_matches_labels_in_any_order_and_sums_samples() -> None:
    assert metric_value(METRICS, "sidecar_idempotency_total", result="first") == 1234
    assert metric_value(METRICS, "sidecar_requests_total", outcome="ok") == 1247
    assert metric_value(METRICS, "sidecar_requests_total", upstream="other", outcome="ok") == 7
    assert metric_value(METRICS, "sidecar_missing_total") == 0


def test_counts_subtract_the_counters_read_before_the_run() -> None:
    assert Counts(110, 3, 120).minus(Counts(10, 1, 20)) == Counts(100, 2, 100)


def test_delivery_ok_allows_only_the_requests_in_flight_when_wrk_stopped() -> None:
    assert delivery_ok("memory", 1000, 0, Counts(1000, 0, 1000), 20)
    assert delivery_ok("memory", 1000, 0, Counts(1020, 0, 1020), 20)
    assert not delivery_ok("memory", 1000, 0, Counts(1021, 0, 1021), 20)
    assert not delivery_ok("memory", 1000, 0, Counts(990, 0, 990), 20)  # some never arrived


def test_delivery_ok_refuses_replays_errors_and_empty_runs() -> None:
    assert not delivery_ok("redis", 1000, 0, Counts(990, 10, 1000), 20)
    assert not delivery_ok("sqlite", 1000, 3, Counts(1000, 0, 1000), 20)
    assert not delivery_ok("sqlite", 0, 0, Counts(0, 0, 0), 20)


def test_the_baseline_needs_no_idempotency_counts() -> None:
    assert delivery_ok("none", 1000, 0, Counts(0, 0, 1000), 20)


def test_overhead_rows_divide_rps_and_subtract_latency_of_the_baseline() -> None:
    runs = [
        {"store": "none", "rps": 2000.0, "p50_ms": 5.0, "p99_ms": 20.0},
        {"store": "redis", "rps": 1500.0, "p50_ms": 7.5, "p99_ms": 31.0},
    ]

    base, redis = overhead_rows(runs)

    assert base["rps_ratio"] == 1.0 and base["added_p50_ms"] == 0.0
    assert redis["rps_ratio"] == pytest.approx(0.75)
    assert redis["added_p50_ms"] == pytest.approx(2.5)
    assert redis["added_p99_ms"] == pytest.approx(11.0)


def test_overhead_rows_without_a_baseline_have_no_ratio() -> None:
    (row,) = overhead_rows([{"store": "memory", "rps": 10.0, "p50_ms": 1.0, "p99_ms": 2.0}])

    assert "rps_ratio" not in row


def test_rounds_go_forward_then_backward() -> None:
    assert round_order(["none", "memory", "redis"], 3) == [
        (0, "none"),
        (0, "memory"),
        (0, "redis"),
        (1, "redis"),
        (1, "memory"),
        (1, "none"),
        (2, "none"),
        (2, "memory"),
        (2, "redis"),
    ]


def test_combine_rounds_sums_counts_and_averages_percentiles() -> None:
    rounds = [_round(1000, 5.0, 4.0, 0.2, True), _round(3000, 5.0, 6.0, 0.4, True)]

    row = combine_rounds("memory", "memory://", rounds)

    assert row["requests"] == 4000
    assert row["rps"] == pytest.approx(400.0)
    assert row["p50_ms"] == pytest.approx(5.0)
    assert row["upstream_ok"] == 4000
    assert row["cpu_us_per_request"] == pytest.approx(150.0)
    assert row["all_delivered"] is True
    assert row["rounds"] == rounds


def test_one_undelivered_round_marks_the_store_undelivered() -> None:
    rounds = [_round(1000, 5.0, 4.0, 0.2, True), _round(1000, 5.0, 4.0, 0.2, False)]

    assert combine_rounds("sqlite", "sqlite:///<tmp>/s.db", rounds)["all_delivered"] is False


def _round(
    requests: int, seconds: float, p50_ms: float, cpu_seconds: float, delivered: bool
) -> dict[str, object]:
    return {
        "requests": requests,
        "seconds": seconds,
        "p50_ms": p50_ms,
        "p90_ms": p50_ms * 2,
        "p99_ms": p50_ms * 4,
        "errors": 0,
        "sidecar_first": requests,
        "sidecar_replayed": 0,
        "upstream_ok": requests,
        "all_delivered": delivered,
        "cpu_seconds": cpu_seconds,
    }


def test_queue_run_end_to_end_counts_enqueue_and_drain_time() -> None:
    run = QueueRun("sqlite", 8, 1000, 1000, 0.5, 1000, 2.0, 0).as_dict()

    assert run["enqueue_per_s"] == 2000
    assert run["drain_per_s"] == 500
    assert run["end_to_end_per_s"] == 400
    assert run["complete"] is True


def test_queue_run_is_incomplete_when_time_ran_out_or_jobs_are_left() -> None:
    assert QueueRun("redis", 1, 1000, 800, 10.0, 800, 1.0, 0).as_dict()["complete"] is False
    assert QueueRun("redis", 1, 1000, 1000, 1.0, 1000, 1.0, 2).as_dict()["complete"] is False


def test_store_label_hides_the_temp_dir_the_prefix_and_secrets(tmp_path: Path) -> None:
    assert store_label(None, tmp_path) == "none (baseline)"
    assert store_label(f"sqlite://{tmp_path}/s.db", tmp_path) == "sqlite:///<tmp>/s.db"
    assert (
        store_label("redis://:pw@127.0.0.1:6379/0?prefix=bench-abc:", tmp_path)
        == "redis://:***@127.0.0.1:6379/0?prefix=<uuid>:"
    )


def test_store_label_hides_the_schema_and_the_user(tmp_path: Path) -> None:
    url = "postgresql://bench:pw@127.0.0.1:5432/postgres?schema=bench_idem_0123"

    assert store_label(url, tmp_path) == (
        "postgresql://bench:***@127.0.0.1:5432/postgres?schema=<unique>"
    )


def test_postgres_store_url_adds_a_schema_the_store_accepts() -> None:
    from proxy.storage.postgres import quoted_schema

    schema = new_schema("jobs")

    assert quoted_schema(schema) == f'"{schema}"'  # a plain lower-case name
    assert schema != new_schema("jobs")
    assert postgres_store_url("postgresql://h/db", schema) == f"postgresql://h/db?schema={schema}"
    assert postgres_store_url("postgresql://h/db?sslmode=disable", "s") == (
        "postgresql://h/db?sslmode=disable&schema=s"
    )


def test_redis_store_url_adds_the_prefix_parameter() -> None:
    assert redis_store_url("redis://h:1/0", "p:") == "redis://h:1/0?prefix=p:"
    assert redis_store_url("redis://h:1/0?ssl=1", "p:") == "redis://h:1/0?ssl=1&prefix=p:"


def test_save_section_replaces_its_key_and_keeps_the_others(tmp_path: Path) -> None:
    path = tmp_path / "latest.json"
    path.write_text(json.dumps({"proxy": {"runs": [1]}, "durable": {"old": True}}))

    save_section(path, "durable", {"new": True})

    assert json.loads(path.read_text()) == {"proxy": {"runs": [1]}, "durable": {"new": True}}


def test_save_section_starts_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "results" / "latest.json"

    save_section(path, "durable", {"x": 1})

    assert json.loads(path.read_text()) == {"durable": {"x": 1}}


class ListQueue:
    """Just enough of a JobQueue for the enqueue and drain loops: a FIFO in memory."""

    def __init__(self) -> None:
        self.pending: list[Job] = []
        self.acked = 0

    async def enqueue(self, job: Job) -> bool:
        await asyncio.sleep(0)
        self.pending.append(job)
        return True

    async def take(self, consumer: str, visibility_timeout: float) -> Job | None:
        return self.pending.pop(0) if self.pending else None

    async def ack(self, job: Job) -> None:
        self.acked += 1


async def test_enqueue_jobs_shares_the_count_among_producers() -> None:
    queue = ListQueue()

    done, seconds = await enqueue_jobs(queue, 25, 8, max_seconds=10)  # type: ignore[arg-type]

    assert done == 25
    assert sorted(job.payload["n"] for job in queue.pending) == list(range(1, 26))
    assert {job.type for job in queue.pending} == {JOB_TYPE}
    assert seconds >= 0


async def test_drain_jobs_stops_once_every_job_is_acked() -> None:
    queue = ListQueue()
    for n in range(30):
        queue.pending.append(Job(JOB_TYPE, {"n": n}))

    handled, _ = await drain_jobs(queue, 30, 8, max_seconds=10)  # type: ignore[arg-type]

    assert handled == 30
    assert queue.acked == 30
    assert queue.pending == []


def test_markdown_shows_both_tables_and_flags_undelivered_runs() -> None:
    durable = {
        "idempotency": {
            "connections": 20,
            "seconds": 10,
            "rounds": 2,
            "warmup_seconds": 2,
            "runs": overhead_rows(
                [
                    _idem_run("none", "none (baseline)", 2000.0, True),
                    _idem_run("redis", "redis://h:1/0?prefix=<uuid>:", 1000.0, False),
                ]
            ),
        },
        "queue": {
            "jobs": 5000,
            "max_seconds_per_phase": 30,
            "runs": [QueueRun("sqlite", 1, 5000, 5000, 1.0, 4000, 4.0, 1000).as_dict()],
        },
        "redis": {"url": "redis://h:1/0", "unavailable": None},
    }

    text = markdown(durable)

    assert "| `none (baseline)` | 2,000 | 1.00x |" in text
    assert "| `redis://h:1/0?prefix=<uuid>:` | 1,000 | 0.50x |" in text
    assert "(check!)" in text
    assert "10 s per store in 2 rounds" in text
    assert "| sqlite | 1 | 4,000 of 5,000 | 5,000 | 1,000 | 800 | 1000 |" in text
    assert "unavailable" not in text


def test_markdown_says_why_postgresql_was_skipped() -> None:
    durable = {
        "idempotency": {
            "connections": 20,
            "seconds": 10,
            "rounds": 2,
            "warmup_seconds": 2,
            "runs": overhead_rows([_idem_run("none", "none (baseline)", 2000.0, True)]),
        },
        "queue": {"jobs": 2000, "max_seconds_per_phase": 15, "runs": []},
        "redis": {"url": "redis://h:1/0", "unavailable": None},
        "postgresql": {"url": "postgresql://***@h:5432/db", "unavailable": "refused"},
    }

    text = markdown(durable)

    assert "PostgreSQL (postgresql://***@h:5432/db) was unavailable: refused." in text
    assert "Redis" not in text


def _idem_run(store: str, label: str, rps: float, delivered: bool) -> dict[str, object]:
    return {
        "store": store,
        "store_url": label,
        "rps": rps,
        "p50_ms": 5.0,
        "p99_ms": 9.0,
        "errors": 0,
        "upstream_ok": rps * 10,
        "all_delivered": delivered,
        "cpu_us_per_request": 200.0,
    }


def test_events_phase_is_skipped_without_a_broker(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_events(QUICK, None) == {"skipped": "RabbitMQ unavailable"}
    assert "skipping the events phase" in capsys.readouterr().out


async def test_publish_events_confirms_every_event_into_the_bound_queue() -> None:
    url = "amqp://guest:guest@127.0.0.1:5672/%2F"
    if await asyncio.to_thread(amqp_available, url) is not None:
        pytest.skip("no RabbitMQ on 127.0.0.1:5672")

    row = await publish_events(url, 250, 100)

    assert row["confirmed"] == 250
    assert row["in_queue"] == 250
    assert row["batch"] == 100
    assert row["events_per_s"] > 0
