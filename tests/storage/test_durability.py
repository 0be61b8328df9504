"""Whether each store keeps its data over a restart of its server, as the sidecar reports
it at start: `sidecar_store_durable{store}` (1 durable, 0 not, -1 unknown) and a warning
naming the store and what a restart loses."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy.app import Sidecar
from proxy.storage.open import probe_durability
from tests.checkout.ledger_checks import UPSTREAMS, sidecar_config
from tests.conftest import make_config

from .redis_servers import RedisProcess, redis_server

SHARED_REDIS = "redis://127.0.0.1:6379/0"
PASSWORD = "hunter2-Zq"
STORES = ("idempotency", "journal", "queue")


def checkout_config(store: str) -> dict[str, Any]:
    """The shipped config with a checkout (so the journal is opened), its state in `store`.
    Nothing calls the upstreams: only the start is under test."""
    urls = {name: "http://127.0.0.1:9" for name in UPSTREAMS}
    return sidecar_config(urls, store=store, recovery_interval="1h")


@pytest.fixture
async def started() -> AsyncIterator[list[Sidecar]]:
    """Sidecars a test starts, closed at its end."""
    sidecars: list[Sidecar] = []
    yield sidecars
    for sidecar in sidecars:
        await sidecar.close()


async def start(sidecars: list[Sidecar], store: str) -> dict[str, float | None]:
    sidecar = Sidecar(make_config(checkout_config(store)))
    sidecars.append(sidecar)
    await sidecar.start(run_workers=False, recover=False)
    registry = sidecar.metrics.registry
    return {s: registry.get_sample_value("sidecar_store_durable", {"store": s}) for s in STORES}


def durability_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "store_durability"]


@pytest.fixture
def aof_redis() -> Iterator[RedisProcess]:
    with redis_server(persistence=True) as server:
        yield server


@pytest.fixture
def config_renamed_redis() -> Iterator[RedisProcess]:
    """A Redis whose CONFIG command is gone, as on many managed services."""
    with redis_server("--rename-command", "CONFIG", "") as server:
        yield server


def shared_redis_persists() -> bool | None:
    """Whether the shared Redis persists (None: it is not there)."""
    client = redis.Redis.from_url(SHARED_REDIS, socket_connect_timeout=0.5, decode_responses=True)
    try:
        settings = {**client.config_get("appendonly"), **client.config_get("save")}
    except redis.RedisError:
        return None
    finally:
        client.close()
    return settings.get("appendonly") == "yes" or bool(settings.get("save"))


async def test_sqlite_counts_as_durable_and_memory_as_not(tmp_path: Path) -> None:
    assert (await probe_durability(f"sqlite://{tmp_path}/s.db")).durable is True
    assert (await probe_durability("memory://")).durable is False


async def test_a_redis_with_an_append_only_file_is_durable(
    aof_redis: RedisProcess, started: list[Sidecar], caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://127.0.0.1:{aof_redis.port}/0?prefix=t-{uuid.uuid4().hex}:"
    with caplog.at_level(logging.INFO, logger="proxy.durable"):
        gauges = await start(started, url)
    assert gauges == dict.fromkeys(STORES, 1.0)
    assert durability_lines(caplog) == []


async def test_a_redis_without_persistence_gives_0_and_a_warning_per_store(
    started: list[Sidecar], caplog: pytest.LogCaptureFixture
) -> None:
    persists = shared_redis_persists()
    if persists is None:
        pytest.skip(f"no Redis at {SHARED_REDIS}")
    if persists:
        pytest.skip(f"the Redis at {SHARED_REDIS} persists")
    url = f"{SHARED_REDIS}?prefix=t-{uuid.uuid4().hex}:"
    with caplog.at_level(logging.INFO, logger="proxy.durable"):
        gauges = await start(started, url)
    assert gauges == dict.fromkeys(STORES, 0.0)
    lines = durability_lines(caplog)
    assert sorted(getattr(r, "store", "") for r in lines) == sorted(STORES)
    for record in lines:
        message = record.getMessage()
        assert record.levelno == logging.WARNING
        assert f"the {getattr(record, 'store', '')} store redis://127.0.0.1:6379/0 " in message
        assert "appendonly no" in message and "a restart loses" in message
        assert "prefix=" not in message
    journal = next(r for r in lines if getattr(r, "store", "") == "journal").getMessage()
    assert "authorizations" in journal


async def test_the_warning_and_the_detail_never_show_the_password(
    started: list[Sidecar], caplog: pytest.LogCaptureFixture
) -> None:
    with redis_server(password=PASSWORD) as server:
        url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0?prefix=t-{uuid.uuid4().hex}:"
        with caplog.at_level(logging.INFO, logger="proxy.durable"):
            gauges = await start(started, url)
        wrong = await probe_durability(url.replace(PASSWORD, "wr0ng-Pw"))
    assert gauges == dict.fromkeys(STORES, 0.0)
    lines = durability_lines(caplog)
    assert len(lines) == 3
    for record in lines:
        assert f"redis://:***@127.0.0.1:{server.port}/0 " in record.getMessage()
        assert PASSWORD not in record.getMessage() + repr(record.__dict__)
    assert wrong.durable is None  # AUTH refused: nobody can tell
    assert "wr0ng-Pw" not in wrong.detail


async def test_a_redis_that_refuses_config_is_unknown_and_logged_at_info(
    config_renamed_redis: RedisProcess,
    started: list[Sidecar],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"redis://127.0.0.1:{config_renamed_redis.port}/0?prefix=t-{uuid.uuid4().hex}:"
    with caplog.at_level(logging.INFO, logger="proxy.durable"):
        gauges = await start(started, url)
    assert gauges == dict.fromkeys(STORES, -1.0)
    lines = durability_lines(caplog)
    assert {r.levelno for r in lines} == {logging.INFO}
    assert all("CONFIG GET refused" in r.getMessage() for r in lines)


async def test_an_unreachable_redis_is_unknown_and_the_start_goes_on() -> None:
    durability = await probe_durability(
        "redis://127.0.0.1:9/0?socket_connect_timeout=0.2&socket_timeout=0.2"
    )
    assert durability.durable is None
    assert "ConnectionError" in durability.detail
