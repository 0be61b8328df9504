"""A sidecar killed after its decisions were journalled but before their events were
published: the restarted sidecar publishes every one of them.

The first sidecar runs as a child process whose broker cannot be reached (a closed
port), so each decision's events stay in the outbox of its SQLite journal; it is
then SIGKILLed. The same store is started again with the test's broker, and its
relay and recovery publish what the first one left.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiohttp
import pytest

from proxy.checkout.flow import checkout_id_for
from proxy.simulator import start_simulator
from tests.checkout.ledger_checks import (
    SIM_CONFIG,
    checkout_body,
    post_checkout,
    sidecar_config,
    start_sidecar_process,
    wait_until,
    write_yaml,
)
from tests.events.conftest import Consumer

CHECKOUTS = 12


def unsent_in(store: Path) -> set[str]:
    with sqlite3.connect(store) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM checkout_outbox")}


@pytest.mark.timeout(120)
async def test_events_unpublished_at_a_sigkill_are_published_after_the_restart(
    consumer: Consumer, tmp_path: Path
) -> None:
    store = tmp_path / "state.db"
    async with await start_simulator(SIM_CONFIG) as sim:
        urls = {name: sim.url(name) for name in sim.ports}
        config = sidecar_config(urls, store=f"sqlite://{store}")
        config["events"] = {
            "broker": "amqp://guest:guest@127.0.0.1:1/%2F",  # nothing listens there
            "exchange": consumer.exchange,
            "types": ["checkout.confirmed", "checkout.rejected"],
            "relay_interval": "100ms",
            "publish_timeout": "1s",
        }
        keys = [f"events-crash-{i}" for i in range(CHECKOUTS)]
        bodies = [
            {**checkout_body(i), "card": "declined" if i % 4 == 0 else "4242"}
            for i in range(CHECKOUTS)
        ]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
            first, base, _ = await start_sidecar_process(
                write_yaml(tmp_path / "first.yaml", config), tmp_path / "sidecar-1.log"
            )
            try:
                answers = [
                    await post_checkout(client, base, key, body)
                    for key, body in zip(keys, bodies, strict=True)
                ]
                first.kill()
            finally:
                await first.stop()

            decided = {
                checkout_id_for(key): body.get("decision")
                for key, (_, body) in zip(keys, answers, strict=True)
            }
            confirmed = {cid for cid, d in decided.items() if d == "confirmed"}
            rejected = {cid for cid, d in decided.items() if d == "rejected"}
            assert len(confirmed) == 9 and len(rejected) == 3, answers
            assert unsent_in(store) == {f"{c}:checkout.confirmed" for c in confirmed} | {
                f"{c}:checkout.rejected" for c in rejected
            }
            assert consumer.received == []

            config["events"]["broker"] = consumer.broker
            second, _, _ = await start_sidecar_process(
                write_yaml(tmp_path / "second.yaml", config), tmp_path / "sidecar-2.log"
            )
            try:

                async def all_published() -> bool:
                    return (
                        set(consumer.of_type("checkout.confirmed")) == confirmed
                        and set(consumer.of_type("checkout.rejected")) == rejected
                    )

                await wait_until(all_published, 20, "the left events to be published")

                async def outbox_empty() -> bool:
                    return not unsent_in(store)

                await wait_until(outbox_empty, 10, "the outbox to be marked sent")
            finally:
                await second.stop()

    assert len(consumer.by_id()) == CHECKOUTS
    for event in consumer.of_type("checkout.rejected").values():
        assert event["data"]["failed_steps"] == ["payment"]
