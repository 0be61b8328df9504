"""The checkout benchmark's pieces: store targets, the sidecar's environment, the
per-store arithmetic and the report. No load is generated and no server is started."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.checkout import (
    BLOCK_ORDER,
    FULL,
    QUICK,
    STORES,
    combined,
    issue14_rows,
    markdown,
    sidecar_env,
    store_rows,
    store_targets,
)

PORTS = {"inventory": 1, "payment": 2, "shipping": 3, "coupon": 4, "fraud": 5}
URLS = {name: f"http://127.0.0.1:{port}" for name, port in PORTS.items()}


def test_every_store_gets_a_target_with_its_own_namespace(tmp_path: Path) -> None:
    targets = store_targets(tmp_path, "redis://h:6379/0", "postgresql://pg@h:5432/db")

    assert [t.store for t in targets] == list(STORES)
    memory, sqlite, redis, postgres = targets
    assert memory.url == "memory://"
    assert sqlite.url == f"sqlite://{tmp_path}/sidecar-sqlite/state.db"
    assert redis.redis_prefix is not None
    assert redis.url == f"redis://h:6379/0?prefix={redis.redis_prefix}"
    assert postgres.postgres_schema is not None
    assert postgres.url == f"postgresql://pg@h:5432/db?schema={postgres.postgres_schema}"
    again = store_targets(tmp_path, "redis://h:6379/0", "postgresql://pg@h:5432/db")
    assert again[2].redis_prefix != redis.redis_prefix
    assert again[3].postgres_schema != postgres.postgres_schema


def test_unreachable_servers_leave_their_stores_out(tmp_path: Path) -> None:
    assert [t.store for t in store_targets(tmp_path, None, None)] == ["memory", "sqlite"]


def test_sidecar_env_sets_the_store_and_points_every_upstream_at_the_simulator() -> None:
    env = sidecar_env(URLS, "postgresql://pg@h:5432/db?schema=s")

    assert env["SIDECAR_STORE"] == "postgresql://pg@h:5432/db?schema=s"
    assert env["PAYMENT_UPSTREAM"] == "http://127.0.0.1:2"
    assert env["ORDERS_CALLBACK"] == "http://127.0.0.1:5/_notify"
    assert env["SIDECAR_LISTEN"] != env["SIDECAR_ADMIN_LISTEN"]


def test_store_rows_subtract_the_gather_baseline() -> None:
    rows = store_rows(
        [_run("sidecar", 330.0, 360.0), _run("sidecar", None, None)], _run("parallel", 310.0, 330.0)
    )

    assert rows[0]["p50_over_gather_ms"] == pytest.approx(20.0)
    assert rows[0]["p99_over_gather_ms"] == pytest.approx(30.0)
    assert rows[1]["p50_over_gather_ms"] is None


def test_per_store_runs_are_bounded_and_shorter_than_the_naive_modes() -> None:
    for plan in (FULL, QUICK):
        assert plan.store_count <= plan.count
        assert plan.store_max_seconds <= plan.max_seconds


def test_markdown_has_the_modes_and_the_per_store_table() -> None:
    gather = _run("parallel", 310.0, 330.0)
    sqlite = {**_run("sidecar", 330.0, 370.0), "store": "sqlite", "store_url": "sqlite:///<tmp>/s"}
    postgres = {
        **_run("sidecar", 345.5, 400.0),
        "store": "postgresql",
        "store_url": "postgresql://***@h:5432/db?schema=<unique>",
    }
    result = {
        "upstream_latency_ms": {"inventory": 50},
        "plan": FULL.__dict__,
        "mode_store": "sqlite",
        "runs": [_run("sidecar", 330.0, 370.0), _run("sequential", 660.0, 690.0), gather],
        "stores": store_rows([sqlite, postgres], gather),
        "unavailable": {"redis": "ConnectionError: refused", "postgresql": None},
        "ratios": {
            "sidecar_vs_sequential": {"p50": 0.5, "p99": 0.54, "throughput": 2.0},
            "sidecar_vs_parallel": {"p50": 1.06, "p99": 1.12, "throughput": 0.95},
        },
    }

    text = markdown(result)

    assert "| sequential | 0.50x | 0.54x | 2.00x |" in text
    assert "| `sqlite:///<tmp>/s` | 600 | 0 | 330.0 | n/a | +20.0 | 370.0 |" in text
    assert "| `postgresql://***@h:5432/db?schema=<unique>` | 600 | 0 | 345.5 | n/a | +35.5 |" in (
        text
    )
    assert "| sqlite | +20.0 | 3 | **miss** |" in text
    assert "(310.0 ms)" in text
    assert "redis was unavailable and skipped: ConnectionError: refused" in text
    assert "postgresql was unavailable" not in text


def test_a_store_is_compared_with_its_own_adjacent_gather_runs() -> None:
    own = {**_run("sidecar", 312.0, 360.0), "store": "memory", "gather_p50s_ms": [308.0, 310.0]}
    own["gather_p50_ms"] = 309.0
    far = {**_run("sidecar", 340.0, 360.0), "store": "redis"}
    rows = store_rows([own, far], _run("parallel", 330.0, 350.0))

    assert rows[0]["p50_over_gather_ms"] == pytest.approx(3.0)  # vs 309, not vs 330
    assert rows[1]["p50_over_gather_ms"] == pytest.approx(10.0)  # no runs of its own
    memory, redis = issue14_rows({"stores": rows})
    assert memory == {"store": "memory", "p50_over_gather_ms": 3.0, "target_ms": 3.0, "pass": True}
    assert redis == {"store": "redis", "p50_over_gather_ms": 10.0, "target_ms": 3.0, "pass": False}
    assert "| `m` | 600 | 0 | 312.0 | 308.0, 310.0 | +3.0 |" in markdown(
        {
            "upstream_latency_ms": {"inventory": 50},
            "plan": FULL.__dict__,
            "runs": [_run("parallel", 330.0, 350.0)],
            "stores": [{**rows[0], "store_url": "m"}],
            "ratios": {},
        }
    )


def _run(mode: str, p50: float | None, p99: float | None) -> dict[str, Any]:
    return {
        "mode": mode,
        "ok": 600,
        "errors": 0,
        "p50_ms": p50,
        "p99_ms": p99,
        "checkouts_per_s": 60.0,
        "ledger": {"authorizations": 600, "captures": 600},
    }


def test_interleaved_blocks_pool_their_latencies_and_keep_each_blocks_p50() -> None:
    def block(latencies: list[float], errors: int = 0) -> dict[str, Any]:
        return {
            "mode": "parallel",
            "concurrency": 20,
            "started": len(latencies) + errors,
            "errors": errors,
            "error_samples": ["TimeoutError: "] * errors,
            "seconds": 1.0,
            "p50_ms": sorted(latencies)[len(latencies) // 2],
            "latencies_ms": sorted(latencies),
        }

    # the pooled p50 is the nearest rank of all six, not the mean of the blocks' p50s
    row = combined([block([300.0, 301.0, 302.0]), block([310.0, 311.0, 312.0], errors=1)])
    assert row["ok"] == 6 and row["errors"] == 1 and row["started"] == 7
    assert row["p50_ms"] == 310.0 and row["block_p50s_ms"] == [301.0, 311.0]
    assert row["checkouts_per_s"] == 3.0 and "latencies_ms" not in row
    # alternating A B B A: as many blocks of each, and each side first once per pair
    assert BLOCK_ORDER.count("sidecar") == BLOCK_ORDER.count("parallel")
    assert BLOCK_ORDER[:4] == ("parallel", "sidecar", "sidecar", "parallel")
